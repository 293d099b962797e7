"""Limits through Envoy over TLS: per-address rate and concurrent uploads answer 429 with Retry-After and the
JSON error; a client that stops sending mid-upload is cut off by Envoy's idle timeout and its spool file goes;
headers over the one limit are refused with 431 (REST) or INVALID_ARGUMENT (gRPC)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
from collections.abc import Iterator

import grpc
import pytest

from gridstor.v1 import meta_pb2
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


OVER_HEADERS = re.compile(r"the request headers are \d+ bytes, over the gateway's limit of 16384 bytes")


def test_one_header_limit_end_to_end(gw: Gateway) -> None:
    """limits.edge_max_request_headers_kb (16 here) is the one limit: under it the services answer (gRPC's own
    8 KiB default would have refused with 429 listing internal header names), over it 431 / INVALID_ARGUMENT."""
    under, over = "a" * 12_000, "a" * 20_000
    for i, version in enumerate(("--http1.1", "--http2")):
        status, _, body = from_addr(gw, f"127.0.0.{10 + i}", version, "-H", f"x-filler: {under}", f"{gw.edge}{BAD_ID}")
        assert status == 404, body  # the service's answer: no such file
        status, _, body = from_addr(gw, f"127.0.0.{12 + i}", version, "-H", f"x-filler: {over}", f"{gw.edge}{BAD_ID}")
        assert status == 431, body
        reply = json.loads(body)
        assert reply["code"] == 3 and OVER_HEADERS.fullmatch(reply["message"]), reply
    # gRPC through the edge: a clear INVALID_ARGUMENT, never RESOURCE_EXHAUSTED
    credentials = grpc.ssl_channel_credentials(gw.ca.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{gw.envoy_port}", credentials) as channel:
        stat = channel.unary_unary(
            "/gridstor.v1.MetaService/Stat", meta_pb2.StatRequest.SerializeToString, meta_pb2.StatReply.FromString
        )
        request = meta_pb2.StatRequest(id="0" * 56)
        for filler, code in ((under, grpc.StatusCode.NOT_FOUND), (over, grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as info:
                stat(request, metadata=(("x-filler", filler),), timeout=30)
            err = info.value
            assert isinstance(err, grpc.Call) and err.code() == code, err
        assert OVER_HEADERS.fullmatch(err.details() or ""), err.details()
    # Past twice the limit Envoy's codec answers itself (HTTP/1.1: 431; HTTP/2 could only reset the stream).
    status, _, _ = from_addr(gw, "127.0.0.14", "--http1.1", "-H", "x-filler: " + "a" * 40_000, f"{gw.edge}{BAD_ID}")
    assert status == 431
    assert from_addr(gw, "127.0.0.15", f"{gw.edge}{BAD_ID}")[0] == 404  # still serving


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
