"""Run a real 0-db (zdb) server for tests.

The binary comes from ``$ZDB_BIN``, else ``zdb`` on PATH; without either, tests
that ask for one are skipped (0-db is not packaged for Debian or PyPI; build it
from https://github.com/threefoldtech/0-db and point ZDB_BIN at ``bin/zdb``).

Each server listens on a free loopback port with its data and index in a temp
folder, and a small ``--datasize``: 0-db fallocates that many bytes for every
namespace and every new datafile (256 MiB by default).

    proc = start_zdb(tmp_path, admin="secret")   # skips when there is no binary
    proc.uri("ns", password="pw")                # ZdbURI for that namespace
    proc.command("NSNEW", "ns")                  # admin command, sync
    proc.stop(); proc.start()                    # restart on the same data and port
    proc.kill()                                  # SIGKILL, for "backend down" tests
    proc.pause(); proc.resume()                  # SIGSTOP / SIGCONT, for timeouts

Fixtures (in tests/conftest.py): ``zdb_server`` (one fresh server per test)
and ``zdb_factory`` (call it for more servers or for admin/mode options).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis

from services.common.backends.uri import ZdbURI
from tests.helpers import free_port, stop_process, wait_until

SKIP_REASON = "0-db not available: set ZDB_BIN to a zdb binary (see README)"
DEFAULT_DATASIZE = 32 * 1024 * 1024
STARTUP_TIMEOUT = 10.0
HOST = "127.0.0.1"


def zdb_binary() -> str | None:
    """The zdb executable to use, or None when there is none."""
    env = os.environ.get("ZDB_BIN")
    if env and os.path.isfile(env) and os.access(env, os.X_OK):
        return env
    return shutil.which("zdb")


def require_zdb() -> str:
    """The zdb executable, or skip the calling test."""
    binary = zdb_binary()
    if binary is None:
        env = os.environ.get("ZDB_BIN")
        extra = f" (ZDB_BIN={env!r} is not an executable file)" if env else ""
        pytest.skip(SKIP_REASON + extra)
    return binary


def _pings(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class ZdbProcess:
    """One zdb server process on a fixed port and data folder (restartable)."""

    def __init__(
        self,
        binary: str,
        root: Path,
        *,
        admin: str | None = None,
        mode: str | None = None,
        datasize: int = DEFAULT_DATASIZE,
        port: int | None = None,
    ) -> None:
        self.binary = binary
        self.root = Path(root)
        self.admin = admin
        self.mode = mode
        self.datasize = datasize
        self.host = HOST
        self.port = port if port is not None else free_port(HOST)
        self.log_path = self.root / "zdb.log"
        self._proc: subprocess.Popen[bytes] | None = None

    #: The server's environment (None: this process's).
    env: dict[str, str] | None = None

    # -- lifecycle --------------------------------------------------------

    def argv(self) -> list[str]:
        args = [
            self.binary,
            "--listen",
            self.host,
            "--port",
            str(self.port),
            "--data",
            str(self.root / "data"),
            "--index",
            str(self.root / "index"),
            "--datasize",
            str(self.datasize),
        ]
        if self.admin is not None:
            args += ["--admin", self.admin]
        if self.mode is not None:
            args += ["--mode", self.mode]
        return args

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> ZdbProcess:
        """Start (or restart) the server and wait until it answers PING."""
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        self._proc = proc

        def pings() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"zdb exited with code {proc.returncode} on start:\n{self.log_tail()}")
            return _pings(self.host, self.port)

        try:
            what = f"zdb to answer PING on {self.host}:{self.port}"
            wait_until(pings, what, within=STARTUP_TIMEOUT, interval=0.02, detail=self.log_tail)
        except AssertionError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL if it lingers)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # in case it was paused
        stop_process(proc, timeout)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5.0)

    def pause(self) -> None:
        """SIGSTOP the server: connections are accepted by the kernel but nothing answers."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> ZdbProcess:
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ZdbProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- helpers ----------------------------------------------------------

    def uri(self, namespace: str, password: str | None = None) -> ZdbURI:
        return ZdbURI(host=self.host, port=self.port, namespace=namespace, password=password)

    def command(self, *args: Any) -> Any:
        """Run one command on a fresh admin connection (default namespace) and return the raw reply."""
        client = redis.Redis(
            host=self.host, port=self.port, protocol=2, driver_info=None, single_connection_client=True
        )
        try:
            for name in ("SET", "AUTH", "SELECT"):
                client.set_response_callback(name, lambda response, **_: response)
            if self.admin is not None:
                client.execute_command("AUTH", self.admin)  # type: ignore[no-untyped-call]
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ZdbProcess {self.host}:{self.port} {state} root={self.root}>"


def start_zdb(
    tmp_path: Path,
    admin: str | None = None,
    *,
    mode: str | None = None,
    datasize: int = DEFAULT_DATASIZE,
) -> ZdbProcess:
    """Start a zdb under ``tmp_path`` (skips the test when there is no binary). The caller stops it."""
    binary = require_zdb()
    return ZdbProcess(binary, tmp_path, admin=admin, mode=mode, datasize=datasize).start()
