"""The processes the launcher runs: started in their own session, logged to a file, restarted, stopped in order.

A child that dies is started again with the same command after a backoff (``Restarts``:
FIRST_DELAY, doubling up to MAX_DELAY, back to FIRST_DELAY once it ran STABLE_AFTER
seconds); ``max_restarts`` restarts within ``window`` seconds is a crash loop, and the
launcher gives up (services/launcher/supervisor.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGKILL

LOG_TAIL_LINES = 20
PR_SET_PDEATHSIG = 1
FIRST_DELAY = 0.5  # seconds before a dead child is started again
MAX_DELAY = 30.0
STABLE_AFTER = 60.0  # a child that ran this long before dying starts over at FIRST_DELAY
MAX_RESTARTS = 5  # restarts within WINDOW seconds before the launcher gives up on a child
WINDOW = 120.0


# setpriv (util-linux, on every Debian) sets the parent-death signal and execs the child: no Python code
# between fork and exec, which is unsafe once the launcher has threads (grpc's, after the first health check).
SETPRIV = shutil.which("setpriv")


def dying_with_parent(argv: list[str], *, threads: bool = False) -> tuple[list[str], Callable[[], None] | None]:
    """``argv`` and the preexec hook to start it with, so that it gets SIGTERM if this process dies (even by SIGKILL).

    With setpriv the hook is None; without it, a Python hook, only while this process has no
    threads (``threads``: it may have some now, so the child is started without one).
    """
    if SETPRIV:
        return [SETPRIV, "--pdeathsig", "TERM", "--", *argv], None
    return argv, None if threads else _die_with_parent(os.getpid())


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec hook doing what setpriv does, where it is missing (used only before any thread starts)."""

    def hook() -> None:
        # Runs in the forked child before exec: no logging there; without prctl the check below still helps.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, indented for a terminal."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "    (no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (the log is empty)"


@dataclass
class Restarts:
    """When a dead child may start again, and when its deaths are a crash loop (see the module docstring)."""

    max_restarts: int = MAX_RESTARTS
    window: float = WINDOW
    delay: float = FIRST_DELAY
    times: deque[float] = field(default_factory=deque)

    def next_delay(self, ran: float, now: float) -> float | None:
        """Seconds to wait before the next start of a child that ran ``ran`` seconds; None: give up."""
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        if len(self.times) >= self.max_restarts:
            return None
        if ran >= STABLE_AFTER:
            self.delay = FIRST_DELAY
        delay = self.delay
        self.delay = min(self.delay * 2, MAX_DELAY)
        self.times.append(now)
        return delay


@dataclass
class Child:
    """One process the launcher runs, watches and restarts."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: Restarts = field(default_factory=Restarts)
    started: float = 0.0  # time.monotonic() of the last start
    due: float | None = None  # when a dead child starts again (None: running, or not noticed yet)
    env: dict[str, str] = field(default_factory=dict, repr=False)
    cwd: Path = Path()

    def note(self, text: str) -> None:
        """Append a launcher's line to the child's log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n".encode())

    def start(self, env: dict[str, str], cwd: Path, *, threads: bool = False) -> None:
        """Start the process; ``threads``: the launcher may have threads now (no Python hook after fork)."""
        self.env, self.cwd = env, cwd
        self.note(f"started by the gridstor launcher (pid {os.getpid()})")
        self.started = time.monotonic()
        self.due = None
        argv, hook = dying_with_parent(self.argv, threads=threads)
        with open(self.log_path, "ab") as log:
            # Its own session: Ctrl-C reaches only the launcher, which stops the children in order.
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=hook,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def restart(self) -> None:
        """Start the child again with the command, environment and folder of its first start."""
        self.start(self.env, self.cwd, threads=True)

    def kill_group(self, sig: int = SIGKILL) -> None:
        """Signal the child's whole process group (its own helpers, e.g. ingest's workers): SIGKILL by default."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def died(self) -> str:
        """Why the child ended, for a message."""
        assert self.proc is not None
        rc = self.proc.returncode
        if rc is not None and rc < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-rc).name}"
        return f"exited with code {rc}"

    def last_lines(self) -> str:
        """``last lines of LOG:`` and the tail of the child's log, for a message."""
        return f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
