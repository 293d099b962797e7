"""TLS for real: curl, a plain grpcio client and the CLI through Envoy (HTTPS + gRPC over TLS on one port),
Envoy -> services over TLS too; a wrong CA, an expired certificate and plain text are refused clearly."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from google.api import httpbody_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gridstor.v1 import ingest_pb2, ingest_pb2_grpc, meta_pb2, meta_pb2_grpc
from services.cli.app import main as cli_main
from services.common import tls
from tests.gateway import Gateway, curl, run_gateway

MiB = 1024 * 1024
ID = re.compile(r"^[0-9a-f]{56}\.bin$")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Envoy with TLS towards clients and towards the services (which serve TLS on loopback here)."""
    with run_gateway(tmp_path_factory.mktemp("tls"), {"tls": {"edge": True, "internal": True}}) as g:
        yield g


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that did not sign the gateway's certificate."""
    _, cert = tls.generate_ca("some other CA")
    path = tmp_path_factory.mktemp("other") / "ca.pem"
    path.write_bytes(tls.cert_pem(cert))
    return path


def cli(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli_main([str(a) for a in args], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def one_line(err: str) -> str:
    assert err.startswith("gridstor: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_curl_over_tls_with_http2_and_http1(gw: Gateway, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    for version in ("--http2", "--http1.1"):
        up = curl("--cacert", gw.ca, version, "-w", "\n%{http_version}", "--data-binary", f"@{src}",
                  f"{gw.edge}/v1/files?name=in.bin")  # fmt: skip
        body, _, http_version = up.body.rpartition(b"\n")
        assert up.rc == 0 and up.status == 200, (up.stderr, up.body)
        assert http_version == (b"2" if version == "--http2" else b"1.1")
        job = json.loads(body)["job"]
        done = curl("--cacert", gw.ca, f"{gw.edge}/v1/jobs/{job}?wait=true&timeout_seconds=20")
        status = json.loads(done.body)
        assert status["state"] == "JOB_STATE_DONE", status
        got = curl("--cacert", gw.ca, version, f"{gw.edge}/v1/files/{status['file_id']}")
        assert got.status == 200 and hashlib.sha256(got.body).digest() == hashlib.sha256(data).digest()


def test_a_plain_grpcio_client_over_tls(gw: Gateway) -> None:
    data = os.urandom(MiB + 3)
    creds = grpc.ssl_channel_credentials(root_certificates=gw.ca.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{gw.envoy_port}", creds) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        parts = [ingest_pb2.UploadRequest(name="grpc.bin", body=httpbody_pb2.HttpBody(data=data[:1000]))]
        parts.append(ingest_pb2.UploadRequest(body=httpbody_pb2.HttpBody(data=data[1000:])))
        reply = ingest.Upload(iter(parts), timeout=60)
        status = ingest.Status(ingest_pb2.StatusRequest(job=reply.job, wait=True, timeout_seconds=20), timeout=60)
        assert status.file_id.endswith(".bin"), status
        meta = meta_pb2_grpc.MetaServiceStub(channel)
        got = b"".join(m.data for m in meta.Download(meta_pb2.DownloadRequest(id=status.file_id), timeout=60))
        assert got == data


def test_the_cli_over_tls(gw: Gateway, tmp_path: Path) -> None:
    src = tmp_path / "cli.bin"
    src.write_bytes(os.urandom(200_000))
    edge = f"https://127.0.0.1:{gw.envoy_port}"
    code, out, err = cli("--gateway", edge, "--ca", gw.ca, "put", src, "--wait")
    assert code == 0, err
    file_id = out.strip()
    assert ID.match(file_id), out
    code, _, err = cli("--gateway", edge, "--ca", gw.ca, "get", file_id, "-o", tmp_path / "copy.bin")
    assert code == 0, err
    assert (tmp_path / "copy.bin").read_bytes() == src.read_bytes()
    # GRIDSTOR_CA works like --ca.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRIDSTOR_CA", str(gw.ca))
        assert cli("--gateway", edge, "exists", file_id)[0] == 0
    # With --config the CLI talks to the services themselves, over TLS because the config says so.
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(gw.cfg.data_dir), "ports": dict(gw.cfg.ports),
                                      "tls": {"internal": True}}))  # fmt: skip
    code, out, err = cli("--config", config, "stat", file_id)
    assert code == 0, err
    assert "size:    200000 bytes" in out


def test_a_wrong_ca_is_refused_with_a_clear_error(gw: Gateway, other_ca: Path) -> None:
    r = curl("--cacert", other_ca, f"{gw.edge}/v1/files/x")
    assert r.rc == 60, r.stderr  # curl: peer certificate cannot be authenticated with known CA certificates
    creds = grpc.ssl_channel_credentials(root_certificates=other_ca.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{gw.envoy_port}", creds) as channel, pytest.raises(grpc.RpcError) as info:
        meta_pb2_grpc.MetaServiceStub(channel).Exists(meta_pb2.ExistsRequest(id="x"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in (info.value.details() or "")
    code, _, err = cli("--gateway", f"https://127.0.0.1:{gw.envoy_port}", "--ca", other_ca, "exists", "0" * 56)
    assert code == 1
    assert one_line(err) == (
        f"gridstor: TLS with the gateway at 127.0.0.1:{gw.envoy_port} failed: certificate verify failed: unable to"
        f" get local issuer certificate (checked against the CA {other_ca})\n"
    )
    # The services' own ports verify the same way: Envoy and the services trust only the gateway's CA.
    code, _, err = cli(
        "--gateway", f"https://127.0.0.1:{gw.running['meta'].port}", "--ca", other_ca, "exists", "0" * 56
    )
    assert code == 1 and "unable to get local issuer certificate" in one_line(err)


def test_plain_text_to_a_tls_port_is_refused_with_a_clear_error(gw: Gateway) -> None:
    r = curl(f"http://127.0.0.1:{gw.envoy_port}/v1/files/x")
    assert r.status == 400 and b"speaks TLS only: use https://" in r.body
    with grpc.insecure_channel(f"127.0.0.1:{gw.envoy_port}") as channel, pytest.raises(grpc.RpcError) as info:
        meta_pb2_grpc.MetaServiceStub(channel).Exists(meta_pb2.ExistsRequest(id="x"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "speaks TLS only" in (info.value.details() or "")
    code, _, err = cli("--gateway", f"127.0.0.1:{gw.envoy_port}", "exists", "0" * 56)
    assert code == 1
    assert one_line(err) == (
        f"gridstor: the gateway at 127.0.0.1:{gw.envoy_port} speaks TLS only: use --gateway"
        f" https://127.0.0.1:{gw.envoy_port} (and --ca FILE for its CA)\n"
    )
    # A service port with TLS drops a plain-text client; the CLI says why.
    meta_port = gw.running["meta"].port
    with grpc.insecure_channel(f"127.0.0.1:{meta_port}") as channel, pytest.raises(grpc.RpcError) as info:
        meta_pb2_grpc.MetaServiceStub(channel).Exists(meta_pb2.ExistsRequest(id="x"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    code, _, err = cli("--gateway", f"127.0.0.1:{meta_port}", "exists", "0" * 56)
    assert code == 1
    assert one_line(err).startswith(
        f"gridstor: the meta service at 127.0.0.1:{meta_port} speaks TLS: use --gateway https://127.0.0.1:{meta_port}"
    )


def test_an_expired_certificate_is_refused_with_a_clear_error(gw: Gateway, tmp_path: Path) -> None:
    """A server presenting a certificate from the right CA that expired yesterday."""
    files = tls.files(gw.cfg)
    ca_key, ca = tls.load_key(files.ca_key), tls.load_cert(files.ca)
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    key, cert = tls.issue_server_cert(
        ca_key, ca, ["localhost", "127.0.0.1"], not_before=yesterday - dt.timedelta(days=30), not_after=yesterday
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(tls.key_pem(key), tls.cert_pem(cert))]))
    server.start()
    try:
        r = curl("--cacert", gw.ca, f"https://127.0.0.1:{port}/")
        assert r.rc == 60 and "expired" in r.stderr, r.stderr
        creds = grpc.ssl_channel_credentials(root_certificates=gw.ca.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel, pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "CERTIFICATE_VERIFY_FAILED" in (info.value.details() or "")
        code, _, err = cli("--gateway", f"https://127.0.0.1:{port}", "--ca", gw.ca, "exists", "0" * 56)
        assert code == 1
        assert one_line(err) == (
            f"gridstor: TLS with the gateway at 127.0.0.1:{port} failed: certificate verify failed: certificate has"
            f" expired (checked against the CA {gw.ca})\n"
        )
    finally:
        server.stop(0)
