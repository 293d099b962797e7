"""Limits through Envoy over TLS: per-address rate and concurrent uploads answer 429 with Retry-After and the
JSON error; a client that stops sending mid-upload is cut off by Envoy's idle timeout and its spool file goes;
oversized headers are refused."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from collections.abc import Iterator

import pytest

from tests.gateway import Gateway, curl, run_gateway
from tests.helpers import wait_until
from tests.limits.helpers import leases

LIMITS = {
    "exempt": [],  # the clients are on loopback addresses (127.0.0.2 ...), exempt by default
    "rate_per_address": 2,
    "burst_per_address": 4,
    "uploads_per_address": 1,
    "edge_idle_timeout": 1.5,  # Envoy ends a request that moves no bytes for this long
    "edge_max_request_headers_kb": 16,
}
BAD_ID = "/v1/files/" + "0" * 56


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("edge-lim"), {"limits": LIMITS}) as g:  # TLS on, the default
        yield g


def from_addr(gw: Gateway, address: str, *args: str) -> tuple[int, dict[str, str], bytes]:
    r = curl("--cacert", gw.ca, "--interface", address, *args)
    assert r.rc == 0, r.stderr
    return r.status, r.headers, r.body


def upload_from(gw: Gateway, address: str, data: bytes = b"hello") -> tuple[int, dict[str, str], bytes]:
    return from_addr(gw, address, "--data-binary", data.decode(), f"{gw.edge}/v1/files?name=x.txt")


def test_over_the_request_rate_answers_429_with_retry_after(gw: Gateway) -> None:
    for _ in range(4):
        status, _, _ = from_addr(gw, "127.0.0.2", f"{gw.edge}{BAD_ID}")
        assert status == 404  # an unknown file: counted, answered
    status, headers, body = from_addr(gw, "127.0.0.2", f"{gw.edge}{BAD_ID}")
    assert status == 429
    assert headers["retry-after"] == "1"
    assert json.loads(body) == {
        "code": 8,
        "message": "too many requests from address 127.0.0.2 (limit 2 per second); retry in 1 s",
        "details": [],
    }
    assert from_addr(gw, "127.0.0.3", f"{gw.edge}{BAD_ID}")[0] == 404  # another client is not affected


def test_oversized_headers_are_refused(gw: Gateway) -> None:
    # HTTP/1.1 gets a 431; over HTTP/2 Envoy resets the stream instead.
    status, _, _ = from_addr(gw, "127.0.0.9", "--http1.1", "-H", "x-filler: " + "a" * 20_000, f"{gw.edge}{BAD_ID}")
    assert status == 431


def partials(gw: Gateway) -> list[str]:
    """Spool files of uploads still being received (finished ones become <job>.spool until stored)."""
    return [f for f in gw.spool_files() if f.endswith(".part")]


@contextlib.contextmanager
def stalled_upload(gw: Gateway, address: str) -> Iterator[ssl.SSLSocket]:
    """An HTTPS upload from ``address`` that declares 1 MB, sends 100 kB and then nothing."""
    raw = socket.create_connection(("127.0.0.1", gw.envoy_port), timeout=30, source_address=(address, 0))
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    ctx.set_alpn_protocols(["http/1.1"])
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(
            b"POST /v1/files?name=slow.bin HTTP/1.1\r\nHost: gridstor\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b"z" * 100_000
        )
        yield sock


def test_a_stalled_upload_holds_its_slot_until_envoy_cuts_it_off(gw: Gateway) -> None:
    with stalled_upload(gw, "127.0.0.4") as slow:
        wait_until(lambda: leases(gw, "addr", "127.0.0.4"), "the upload lease of 127.0.0.4", until=lambda n: n == 1)
        wait_until(lambda: partials(gw), "its partial spool file", until=lambda p: len(p) == 1)
        # The same client may not start another upload meanwhile ...
        status, headers, body = upload_from(gw, "127.0.0.4")
        assert status == 429 and headers["retry-after"] == "5"
        assert json.loads(body)["message"] == "too many uploads at once from address 127.0.0.4 (limit 1); retry in 5 s"
        # ... while another client's uploads succeed.
        for _ in range(2):
            status, _, body = upload_from(gw, "127.0.0.5")
            assert status == 200, body
            assert len(json.loads(body)["job"]) == 32
        # Envoy's idle timeout ends the stalled request: the client gets an answer and the connection ends.
        slow.settimeout(30)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := slow.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    # ingest saw the stream reset: the spool file and the upload slot are gone.
    wait_until(lambda: leases(gw, "addr", "127.0.0.4"), "the lease of 127.0.0.4 to go", until=lambda n: n == 0)
    wait_until(lambda: partials(gw), "the partial spool file to go", until=lambda p: p == [])
    status, _, body = upload_from(gw, "127.0.0.4")
    assert status == 200, body
