"""Helpers for the whole suite: waiting on a condition, services under test (Served, rpc_error), login
tokens as auth issues them (login_token, bearer), the environment of child processes, free ports,
stopping and running programs.

Disks: ``tmpfs(path, size)`` mounts a small real file system to fill (skipping where mounting is not
permitted). Trees: ``deep_folder`` makes folders deeper than Python's recursion, ``remove_tree``
removes them (pytest's own cleanup of old temp dirs recurses and would fail on one left behind).

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
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
import pytest

from services.common import net, tokens
from services.common.config import Config
from services.common.grants import Grants
from services.common.keys import signing_key
from services.common.metrics import Registry
from services.common.server import Running

T = TypeVar("T")

ENV_PREFIX = "GRIDSTOR_"
WAIT_TIMEOUT = 20.0
WAIT_INTERVAL = 0.05

# -- waiting on a condition ---------------------------------------------------------------------------


class _Wait:
    """One wait's deadline and verdict: ``over(value)`` says whether ``until`` holds, and fails once time is up."""

    def __init__(self, what: str, until: Callable[[Any], object], within: float, detail: Callable[[], str] | None):
        self.what, self.until, self.within, self.detail = what, until, within, detail
        self.deadline = time.monotonic() + within

    def over(self, value: object) -> bool:
        if self.until(value):
            return True
        if time.monotonic() > self.deadline:
            message = f"timed out after {self.within:g} s waiting for {self.what}; last seen: {value!r}"
            raise AssertionError(message + ("\n" + self.detail() if self.detail is not None else ""))
        return False


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
    wait = _Wait(what, until, within, detail)
    while not wait.over(value := probe()):
        time.sleep(interval)
    return value


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
    wait = _Wait(what, until, within, detail)
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if wait.over(value):
            return value
        await asyncio.sleep(interval)


# -- gRPC ------------------------------------------------------------------------------------------------

Build = Callable[..., Awaitable[tuple[Running, Callable[[], Awaitable[None]]]]]


@dataclass
class Served:
    """A service built in-process on port 0 (its ``build(cfg, port=0, registry=...)``) with a plain channel to it."""

    cfg: Config
    running: Running
    cleanup: Callable[[], Awaitable[None]]
    channel: grpc.aio.Channel
    registry: Registry
    stopped: bool = field(default=False, kw_only=True)

    @classmethod
    async def start(
        cls,
        build: Build,
        cfg: Config,
        *,
        port: int = 0,
        registry: Registry | None = None,
        options: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Self:
        """Build and start the service over ``cfg``; ``options`` go to ``build``, ``fields`` to a subclass."""
        registry = registry if registry is not None else Registry()
        running, cleanup = await build(cfg, port=port, registry=registry, **(options or {}))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        return cls(cfg, running, cleanup, channel, registry, **fields)

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self) -> None:
        """Close the channel, stop the server, run the service's cleanup (once; later calls do nothing)."""
        if self.stopped:
            return
        self.stopped = True
        await self.channel.close(None)
        await self.running.server.stop(1)
        await self.cleanup()


@dataclass
class Failure:
    """A failed call: its status code and message."""

    error: grpc.aio.AioRpcError

    def code(self) -> grpc.StatusCode:
        return self.error.code()

    def details(self) -> str:
        return self.error.details() or ""

    def trailers(self) -> dict[str, str]:
        """The call's trailing metadata (e.g. gridstor-error, retry-after)."""
        pairs: Any = self.error.trailing_metadata() or ()
        return {k: v if isinstance(v, str) else v.decode() for k, v in pairs}


async def rpc_error(aw: Awaitable[Any]) -> Failure:
    """The status a call ends with; fails the test when it succeeds."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await aw
    return Failure(info.value)


# -- environment ----------------------------------------------------------------------------------------


def login_token(cfg: Config, identity: str, ttl: int = 3600) -> str:
    """A login token for ``identity`` as auth issues it under ``cfg`` (signed by its key, with its grant)."""
    key = signing_key(cfg.data_dir)
    return tokens.issue(key, identity, ttl, grant=Grants.from_config(cfg, key).grant_for(identity))[0]


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


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


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "4m") mounted on ``path`` for the block: a real small disk to fill.

    Skips the test, saying why, when this process may not mount (not root, or a container without
    CAP_SYS_ADMIN); unmounted afterwards (lazily, so a process still holding a file cannot stop it).
    """
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no mount command for a full-disk test's tmpfs")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full-disk test (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


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


# -- deep trees ---------------------------------------------------------------------------------------


def deep_folder(root: Path, depth: int, name: str = "d") -> int:
    """Make ``root/name/name/...`` ``depth`` levels deep (relative opens: no path length limit); the deepest
    folder's descriptor (the caller closes it)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    return fd


def remove_tree(path: Path) -> None:
    """Remove a tree of any depth (GNU rm walks without recursion; shutil.rmtree stops near 1,000 levels)."""
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)
