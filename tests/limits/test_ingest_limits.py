"""Limits at the ingest service itself (direct gRPC): per-identity concurrent uploads and rate, the upload
idle timeout; one client over its limit is refused with a retry hint while another's uploads go on."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gridstor.v1 import ingest_pb2_grpc
from services.cli.app import main as cli_main
from tests.gateway import Gateway, run_gateway
from tests.helpers import wait_until
from tests.limits.helpers import HeldUpload, bearer, leases, piece, token, trailer

LIMITS = {
    "exempt": [],  # the tests' clients are on loopback, exempt by default
    "uploads_per_identity": 2,
    "uploads_per_address": 100,
    "rate_per_identity": 0.2,  # one request per 5 s once the burst is used
    "burst_per_identity": 5,
    "rate_per_address": 1000,
    "burst_per_address": 1000,
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("lim"), {"limits": LIMITS}, envoy=False) as g:
        yield g


@pytest.fixture(scope="module")
def stub(gw: Gateway) -> Iterator[ingest_pb2_grpc.IngestServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{gw.running['ingest'].port}") as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel)


def test_concurrent_uploads_per_identity(gw: Gateway, stub: ingest_pb2_grpc.IngestServiceStub) -> None:
    alice, bob = bearer(token(gw, "alice")), bearer(token(gw, "bob"))
    held = [HeldUpload(stub, alice, f"a{i}.bin") for i in range(2)]
    # Counted in Redis, where every ingest process looks.
    wait_until(lambda: leases(gw, "id", "alice"), "alice's two upload leases", until=lambda n: n == 2)
    with pytest.raises(grpc.RpcError) as info:
        stub.Upload(iter([piece(b"third")]), metadata=alice, timeout=30)
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "too many uploads at once from identity alice (limit 2); retry in 5 s"
    assert trailer(err, "retry-after") == "5"
    # Another client's uploads keep going meanwhile.
    for i in range(2):
        assert len(stub.Upload(iter([piece(b"bob's bytes %d" % i, "b.txt")]), metadata=bob, timeout=30).job) == 32
    assert all(len(h.finish().job) == 32 for h in held)
    wait_until(lambda: leases(gw, "id", "alice"), "alice's leases to be released", until=lambda n: n == 0)
    assert stub.Upload(iter([piece(b"again", "c.txt")]), metadata=alice, timeout=30).job


def test_requests_per_second_per_identity(gw: Gateway, stub: ingest_pb2_grpc.IngestServiceStub, tmp_path: Path) -> None:
    carol, dave = token(gw, "carol"), token(gw, "dave")
    for i in range(5):  # the burst
        stub.Upload(iter([piece(b"%d" % i, "c.txt")]), metadata=bearer(carol), timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        stub.Upload(iter([piece(b"six", "c.txt")]), metadata=bearer(carol), timeout=30)
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    expected = r"too many requests from identity carol \(limit 0.2 per second\); retry in (\d) s"
    m = re.fullmatch(expected, err.details() or "")
    assert m, err.details()
    assert trailer(err, "retry-after") == m.group(1) and 1 <= int(m.group(1)) <= 5
    assert stub.Upload(iter([piece(b"dave", "d.txt")]), metadata=bearer(dave), timeout=30).job
    # The CLI says it in one line.
    src = tmp_path / "f.txt"
    src.write_text("hello")
    out, errs = io.StringIO(), io.StringIO()
    code = cli_main(["--gateway", f"127.0.0.1:{gw.running['ingest'].port}", "--token", carol, "put", str(src)],
                    stdout=out, stderr=errs)  # fmt: skip
    assert code == 1
    assert re.fullmatch(
        r"gridstor: over a limit: too many requests from identity carol .*retry in \d s\n", errs.getvalue()
    )


def test_a_stalled_upload_is_dropped_with_its_spool_file(tmp_path: Path) -> None:
    with (
        run_gateway(tmp_path, {"limits": LIMITS | {"upload_idle_timeout": 1}}, envoy=False) as gw,
        grpc.insecure_channel(f"127.0.0.1:{gw.running['ingest'].port}") as channel,
    ):
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        erin = bearer(token(gw, "erin"))
        held = HeldUpload(stub, erin, "slow.bin")  # sends one message, then nothing
        err = held.error()
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (err.details() or "").startswith("the upload stalled: nothing arrived for 1 s, so it was dropped")
        wait_until(
            lambda: [f for f in gw.spool_files() if f.endswith(".part")],
            "the stalled upload's spool file to go",
            until=lambda parts: parts == [],
        )
        wait_until(lambda: leases(gw, "id", "erin"), "erin's lease to be released", until=lambda n: n == 0)
        # Uploads that keep sending are not affected.
        assert stub.Upload(iter([piece(b"quick", "q.txt")]), metadata=erin, timeout=30).job
