"""The processes the launcher runs: started in their own session, logged to a file, stopped in order."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOG_TAIL_LINES = 20
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec hook: the child gets SIGTERM if the launcher dies (even by SIGKILL), so nothing is orphaned."""

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
class Child:
    """One process the launcher runs and watches."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str], cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} started by the gridstor launcher (pid {os.getpid()})\n".encode())
            log.flush()
            # Its own session: Ctrl-C reaches only the launcher, which stops the children in order.
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                # preexec_fn is unsafe once threads exist: every child starts before the first gRPC channel.
                preexec_fn=_die_with_parent(os.getpid()),
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill_group(self) -> None:
        """SIGKILL the child's whole process group (its own helpers, e.g. ingest's workers)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

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
