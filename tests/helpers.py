"""Helpers for the whole suite: waiting on a condition, child-process environments, free ports, processes.

Waiting: a test never sleeps to let something happen; it polls for the thing itself and fails
naming what it waited for and what it saw last::

    wait_until(lambda: leases(gw), "alice's leases to be released", until=lambda n: n == 0)
    await wait_until_async(lambda: suite.job_hash(job), "the job to be taken", until=lambda h: h.get("worker"))

``probe`` returns the value to look at (the async form also takes a coroutine function); ``until``
decides whether it is there yet (default: the value is truthy). Both return the last value. A probe
that raises ends the wait at once: that is how a wait gives up early, e.g. when the process it waits
for has died.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from services.common import net

T = TypeVar("T")

ENV_PREFIX = "GRIDSTOR_"
WAIT_TIMEOUT = 20.0
WAIT_INTERVAL = 0.05

# -- waiting on a condition ---------------------------------------------------------------------------


def _timed_out(what: str, within: float, last: object, detail: Callable[[], str] | None) -> AssertionError:
    message = f"timed out after {within:g} s waiting for {what}; last seen: {last!r}"
    if detail is not None:
        message += "\n" + detail()
    return AssertionError(message)


def wait_until(
    probe: Callable[[], T],
    what: str,
    *,
    until: Callable[[T], object] = bool,
    within: float = WAIT_TIMEOUT,
    interval: float = WAIT_INTERVAL,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call ``probe`` until ``until(value)`` holds; its value. Fails naming ``what`` (and ``detail()``, e.g. a log)."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, within, value, detail)
        time.sleep(interval)


async def wait_until_async(
    probe: Callable[[], Any],
    what: str,
    *,
    until: Callable[[Any], object] = bool,
    within: float = WAIT_TIMEOUT,
    interval: float = WAIT_INTERVAL,
    detail: Callable[[], str] | None = None,
) -> Any:
    """:func:`wait_until` on the running event loop; ``probe`` may be a plain or a coroutine function.

    (Typed loosely: mypy cannot pick T from "a function returning T or an awaitable of T".)
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value: Any = probe()
        if inspect.isawaitable(value):
            value = await value
        if until(value):
            return value
        if loop.time() > deadline:
            raise _timed_out(what, within, value, detail)
        await asyncio.sleep(interval)


# -- environment ----------------------------------------------------------------------------------------


def clear_gridstor_env(mp: pytest.MonkeyPatch) -> None:
    """Unset every GRIDSTOR_* variable through ``mp`` (so it is undone with ``mp``)."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        mp.delenv(name)


@contextlib.contextmanager
def gridstor_env_cleared() -> Iterator[None]:
    """No GRIDSTOR_* variable while the block runs: for fixtures that outlive one test (module, session)."""
    with pytest.MonkeyPatch.context() as mp:
        clear_gridstor_env(mp)
        yield


def child_env(*, pythonpath: bool = True, **extra: str) -> dict[str, str]:
    """The environment for a child process: this one without GRIDSTOR_*, plus ``extra``.

    With ``pythonpath`` (a Python child that imports the services) this checkout leads PYTHONPATH.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)} | extra
    return net.child_env(env) if pythonpath else env


# -- ports and processes --------------------------------------------------------------------------------


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` right now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_pair(offset: int) -> int:
    """A free port whose partner ``port + offset`` (a service's metrics port) is free too."""
    for _ in range(50):
        port = free_port()
        if port + offset <= 65535 and port_is_free(port + offset):
            return port
    raise RuntimeError(f"no free port pair (offset {offset}) found")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` and wait for it; SIGKILL if it is still there after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Result:
    """A finished program: exit code, stdout and stderr (decoded)."""

    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"rc={self.rc}\nstdout:\n{self.out}\nstderr:\n{self.err}"


async def run_program(
    *argv: str | Path | int,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: str = "",
    limit: float = 60.0,
) -> Result:
    """Run a program to its end without blocking the event loop (the servers under test run on it).

    Its environment is this one without GRIDSTOR_*, plus ``env``; the test fails if it runs over ``limit`` seconds.
    """
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(pythonpath=False, **(env or {})),
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{argv[0]} did not finish within {limit:g} s: {' '.join(map(str, argv))}")
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
