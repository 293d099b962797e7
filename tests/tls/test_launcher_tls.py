"""TLS around `make up` and compose: the launcher's first-start step and banner, the certificate tool, the
health probe with --ca, metrics over TLS."""

from __future__ import annotations

import asyncio
import os
import ssl
import urllib.request
from pathlib import Path

import pytest

from services import launcher as L
from services.common import tls
from services.common.config import build_config
from services.common.metrics import Registry, serve_metrics
from services.edge import certs, probe
from tests.cli.launcher_proc import write_config
from tests.gateway import run_gateway


def test_the_launcher_makes_the_certificates_and_shows_how_to_trust_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = build_config({}, data_dir=tmp_path)
    launcher = L.Launcher(cfg, tmp_path / "gridstor.yaml", ["auth", "meta", "ingest"], timeout=1, grace=1)
    launcher.prepare_tls()
    out = capsys.readouterr().out
    ca = tmp_path / "tls" / "ca.pem"
    assert f"gridstor: created a local CA: {ca}" in out
    assert "issued the gateway certificate" in out and "localhost, 127.0.0.1, ::1" in out
    assert (tmp_path / "tls" / "server.key").stat().st_mode & 0o777 == 0o600
    text = L.banner(launcher, True)
    assert f"tls:    CA {ca}  (envoy; clients trust this file)" in text
    assert f"REST https://127.0.0.1:{cfg.envoy_port}/v1" in text
    assert f"curl --cacert {ca} -o copy https://127.0.0.1:{cfg.envoy_port}/v1/files/<id>" in text
    assert f"--gateway https://127.0.0.1:{cfg.envoy_port} --ca {ca} stat <id>" in text
    # Next start: nothing new.
    L.Launcher(cfg, tmp_path / "gridstor.yaml", ["meta"], timeout=1, grace=1).prepare_tls()
    assert capsys.readouterr().out == ""


def test_plain_http_only_when_the_config_says_so(tmp_path: Path) -> None:
    cfg = build_config({"tls": {"edge": False}}, data_dir=tmp_path)
    launcher = L.Launcher(cfg, tmp_path / "g.yaml", ["meta"], timeout=1, grace=1)
    launcher.prepare_tls()
    assert not (tmp_path / "tls").exists()  # nothing speaks TLS: nothing made
    text = L.banner(launcher, False)
    assert "tls:    off (tls.edge: false)" in text and f"REST http://127.0.0.1:{cfg.envoy_port}/v1" in text
    assert "--cacert" not in text


def test_a_missing_certificate_of_ones_own_stops_the_launcher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    # Free ports: a gateway already running on the default ones must not decide this test.
    write_config(data, tls={"cert": f"{tmp_path}/le/fullchain.pem", "key": f"{tmp_path}/le/key.pem"})
    assert L.main(["--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gridstor: config: tls.cert: ") and "fullchain.pem does not exist" in err
    assert not (data / "tls").exists()  # nothing generated where the config names files of its own


def test_a_public_edge_certificate_needs_no_ca_file_for_clients(tmp_path: Path) -> None:
    """Envoy with its own certificate (here from another CA, standing in for Let's Encrypt)."""
    ca_key, ca = tls.generate_ca("public CA")
    key, cert = tls.issue_server_cert(ca_key, ca, ["gw.example.org"])
    tls.write_file(tmp_path / "le" / "fullchain.pem", tls.cert_pem(cert), 0o644)
    tls.write_file(tmp_path / "le" / "privkey.pem", tls.key_pem(key), 0o600)
    cfg = build_config(
        {"tls": {"edge_cert": str(tmp_path / "le/fullchain.pem"), "edge_key": str(tmp_path / "le/privkey.pem")}},
        data_dir=tmp_path / "data",
    )
    launcher = L.Launcher(cfg, tmp_path / "g.yaml", ["meta"], timeout=1, grace=1)
    launcher.prepare_tls()
    text = L.banner(launcher, False)
    assert f"tls:    envoy: {tmp_path / 'le/fullchain.pem'}  (its own certificate" in text
    assert "--cacert" not in text and "--ca " not in text
    (tmp_path / "le" / "privkey.pem").write_bytes(tls.key_pem(tls.new_key()))
    with pytest.raises(L.LaunchError, match=r"the key .*privkey\.pem does not belong to the certificate"):
        launcher.prepare_tls()


def test_the_certificate_tool_for_compose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[2]
    argv = ["--config", str(root / "compose/gridstor.yaml"), "--config", str(root / "compose/gridstor-replica.yaml"),
            "--out", str(tmp_path), "--name", "gw.example.org", "--owner", str(os.getuid())]  # fmt: skip
    assert certs.main(argv) == 0
    out = capsys.readouterr().out
    assert "created a local CA" in out
    names = tls.cert_names(tls.load_cert(tmp_path / "server.pem"))
    assert {"auth", "ingest", "meta", "ssh", "maint", "auth-m2", "meta-m2", "maint-m2", "gw.example.org"} <= set(names)
    assert {"localhost", "127.0.0.1", "::1"} <= set(names)
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    ca = (tmp_path / "ca.pem").read_bytes()
    assert certs.main([*argv, "--name", "files.example.org"]) == 0  # a new name: re-issued, same CA
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert "files.example.org" in tls.cert_names(tls.load_cert(tmp_path / "server.pem"))
    assert certs.main(["--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)]) == 2


def test_probe_and_metrics_speak_tls_with_internal_tls(tmp_path: Path) -> None:
    with run_gateway(tmp_path, {"tls": {"internal": True}}, envoy=False) as gw:
        address = f"127.0.0.1:{gw.running['meta'].port}"
        ok, why = probe.grpc_ok(address, ca=str(gw.ca))
        assert ok, why
        ok, why = probe.grpc_ok(address)  # plain text to a TLS port
        assert not ok and "UNAVAILABLE" in why
        assert probe.main(["grpc", address, "--ca", str(gw.ca)]) == 0

    cfg = build_config({"data_dir": str(tmp_path / "m"), "tls": {"internal": True}})
    tls.ensure_local(cfg)

    async def scrape() -> bytes:
        registry = Registry()
        registry.counter("probe_total", "a counter").inc()
        server = await serve_metrics(registry, "127.0.0.1", 0, ssl=tls.server_ssl_context(cfg))
        port = server.sockets[0].getsockname()[1]
        ctx = ssl.create_default_context(cafile=str(tls.files(cfg).ca))
        try:
            return await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=ctx, timeout=10).read()
            )
        finally:
            server.close()

    assert b"probe_total 1" in asyncio.run(scrape())
