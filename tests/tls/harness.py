"""A real gateway for the TLS and limits tests: auth, meta and ingest on port 0 behind a real Envoy.

The services run on an event loop in a background thread (tests/edge's LoopThread), so tests can be
plain functions that run curl, the CLI or blocking gRPC clients against them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.auth import service as auth_service
from services.common import tls
from services.common.config import Config, build_config
from services.common.server import Running
from services.edge.envoy import build_envoy_config
from services.ingest import service as ingest_service
from services.meta import service as meta_service
from tests.edge.conftest import DESCRIPTOR, LoopThread, free_port, start_envoy, stop_process
from tests.redis_server import RedisProcess

MiB = 1024 * 1024


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


def env_without_gridstor() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GRIDSTOR_")}


@contextlib.contextmanager
def run_gateway(root: Path, extra: dict[str, Any], *, envoy: bool = True) -> Iterator[Gateway]:
    """Start redis, (certificates,) meta, auth, ingest and Envoy with the config ``extra``; stop all afterwards."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("GRIDSTOR_")}
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
            return ports

        ports = loop.run(start())
        ports |= {"ssh": free_port(), "maint": free_port()}  # not started: their routes answer 503
        gw.cfg = build_config(raw | {"ports": ports})
        if envoy:
            gw.envoy_port, gw.admin_port = free_port(), free_port()
            boot = build_envoy_config(gw.cfg, DESCRIPTOR, gw.envoy_port, gw.admin_port)
            workdir = root / "envoy"
            workdir.mkdir()
            envoy_proc, _, gw.envoy_log = start_envoy(boot, workdir, gw.admin_port)
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
        os.environ.update(saved)


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
