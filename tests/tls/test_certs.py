"""services/common/tls.py and the tls:/limits: config sections: generation, checks, clear messages."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509

from services.common import tls
from services.common.config import ConfigError, LimitsConfig, TlsConfig, build_config, dump_config


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_makes_a_ca_and_a_server_certificate(tmp_path: Path) -> None:
    cfg = build_config({"data_dir": str(tmp_path), "listen_host": "10.1.2.3", "tls": {"names": ["gw.example.org"]}})
    report = tls.ensure_local(cfg)
    f = tls.files(cfg)
    assert report.created_ca and report.issued
    assert (f.ca, f.cert, f.key) == (tmp_path / "tls/ca.pem", tmp_path / "tls/server.pem", tmp_path / "tls/server.key")
    assert mode(f.key) == 0o600 and mode(f.ca_key) == 0o600 and mode(f.ca) == 0o644
    assert set(report.names) == {"localhost", "127.0.0.1", "::1", "10.1.2.3", "gw.example.org"}
    ca = tls.load_cert(f.ca)
    cert = tls.load_cert(f.cert)
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    years = (ca.not_valid_after_utc - ca.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    assert any("created a local CA" in line for line in report.lines())

    # A second start keeps everything as it is.
    before = {p: p.read_bytes() for p in (f.ca, f.cert, f.key, f.ca_key)}
    again = tls.ensure_local(cfg)
    assert not again.created_ca and not again.issued and again.lines() == []
    assert {p: p.read_bytes() for p in before} == before


def test_a_new_name_or_a_near_expiry_reissues_from_the_same_ca(tmp_path: Path) -> None:
    cfg = build_config({"data_dir": str(tmp_path)})
    tls.ensure_local(cfg)
    f = tls.files(cfg)
    ca_before = f.ca.read_bytes()
    wider = build_config({"data_dir": str(tmp_path), "tls": {"names": ["files.example.org"]}})
    report = tls.ensure_local(wider)
    assert report.issued and not report.created_ca and "files.example.org" in report.names
    assert f.ca.read_bytes() == ca_before  # clients keep trusting the same CA
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=tls.SERVER_DAYS - 10)
    assert tls.ensure_local(wider, now=soon).issued


def test_files_elsewhere_are_checked_never_written(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    cfg = build_config(
        {"data_dir": str(tmp_path / "data"), "tls": {"ca": str(certs / "ca.pem"), "cert": str(certs / "s.pem"),
                                                      "key": str(certs / "s.key")}}
    )  # fmt: skip
    with pytest.raises(tls.TlsError, match=r"tls.cert: .*certs/s.pem does not exist"):
        tls.ensure_local(cfg)
    internal = build_config(
        {"data_dir": str(tmp_path / "data"), "tls": {"internal": True, "ca": str(certs / "ca.pem")}}
    )
    with pytest.raises(tls.TlsError, match=r"tls.ca: .*certs/ca.pem does not exist"):
        tls.ensure_local(internal)
    assert not certs.exists()


def test_expired_mismatched_and_missing_files_are_named(tmp_path: Path) -> None:
    ca_key, ca = tls.generate_ca()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    key, cert = tls.issue_server_cert(ca_key, ca, ["localhost"], not_before=past - dt.timedelta(days=1), not_after=past)
    other_key, _ = tls.issue_server_cert(ca_key, ca, ["localhost"])
    tls.write_file(tmp_path / "c.pem", tls.cert_pem(cert), 0o644)
    tls.write_file(tmp_path / "k.pem", tls.key_pem(key), 0o600)
    tls.write_file(tmp_path / "other.key", tls.key_pem(other_key), 0o600)
    with pytest.raises(tls.TlsError, match=r"the certificate .*c.pem expired on \d{4}-\d\d-\d\d"):
        tls.check_pair(tmp_path / "c.pem", tmp_path / "k.pem")
    with pytest.raises(tls.TlsError, match=r"the key .*other.key does not belong to the certificate"):
        tls.check_pair(tmp_path / "c.pem", tmp_path / "other.key")
    with pytest.raises(tls.TlsError, match=r"tls.key: .*nope.key does not exist"):
        tls.check_pair(tmp_path / "c.pem", tmp_path / "nope.key")
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(tls.TlsError, match="holds no PEM certificate"):
        tls.load_cert(tmp_path / "junk.pem")


def test_services_refuse_to_start_on_an_expired_certificate(tmp_path: Path) -> None:
    cfg = build_config({"data_dir": str(tmp_path), "tls": {"internal": True}})
    tls.ensure_local(cfg)
    ca_key = tls.load_key(tls.files(cfg).ca_key)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    key, cert = tls.issue_server_cert(
        ca_key, tls.load_cert(tls.files(cfg).ca), ["localhost"], not_before=past - dt.timedelta(days=9), not_after=past
    )
    tls.write_file(tls.files(cfg).cert, tls.cert_pem(cert), 0o644)
    tls.write_file(tls.files(cfg).key, tls.key_pem(key), 0o600)
    with pytest.raises(tls.TlsError, match="expired on"):
        tls.server_pair(cfg)
    # The launcher's step re-issues a managed certificate that expired.
    assert tls.ensure_local(cfg).issued
    tls.server_pair(cfg)


def test_internal_tls_follows_the_listen_host_unless_set() -> None:
    assert not build_config({}).internal_tls  # loopback only: plain by default
    assert build_config({"listen_host": "0.0.0.0"}).internal_tls
    assert build_config({"listen_host": "10.0.0.7"}).internal_tls
    assert not build_config({"listen_host": "::1"}).internal_tls
    assert build_config({"tls": {"internal": True}}).internal_tls
    assert not build_config({"listen_host": "0.0.0.0", "tls": {"internal": False}}).internal_tls
    assert build_config({"tls": {"internal": "auto"}}).tls.internal is None
    assert build_config({}).tls.edge  # Envoy speaks TLS unless told not to


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tls": {"edge": "yes"}}, "config: tls.edge: expected true or false"),
        ({"tls": {"internal": "maybe"}}, "config: tls.internal: expected true, false or auto"),
        ({"tls": {"cert": ""}}, "config: tls.cert: expected a file path, got an empty string"),
        ({"tls": {"edge_cert": "/x.pem"}}, "config: tls: edge_cert and edge_key go together"),
        ({"tls": {"names": ["a b"]}}, "config: tls.names[0]: 'a b' is not a DNS name or IP address"),
        ({"tls": {"cafile": "x"}}, "config: tls: unknown setting(s) cafile"),
        ({"limits": {"rate_per_identity": -1}}, "config: limits.rate_per_identity: must be >= 0 (0 = no limit)"),
        ({"limits": {"uploads_per_address": "many"}}, "config: limits.uploads_per_address: expected an integer"),
        ({"limits": {"burst_per_address": 0}}, "config: limits.burst_per_address: must be an integer >= 1"),
        ({"limits": {"upload_idle_timeout": 0}}, "config: limits.upload_idle_timeout: must be positive"),
        ({"limits": {"exempt": ["not an address!"]}}, "config: limits.exempt[0]: 'not an address!' is not an IP"),
        ({"limits": {"trusted_proxies": "envoy"}}, "config: limits.trusted_proxies: expected a list"),
        ({"limits": {"edge_max_request_headers_kb": 9000}}, "config: limits.edge_max_request_headers_kb: must be"),
        ({"limits": {"speed": 1}}, "config: limits: unknown setting(s) speed"),
    ],
)
def test_bad_values_are_named(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    assert str(info.value).startswith(message), str(info.value)


def test_sections_round_trip_to_the_ingest_workers(tmp_path: Path) -> None:
    raw = {
        "data_dir": str(tmp_path),
        "tls": {"internal": True, "ca": "/etc/certs/ca.pem", "edge_cert": "e.pem", "edge_key": "e.key", "names": ["a"]},
        "limits": {"exempt": [], "trusted_proxies": ["envoy", "10.0.0.0/8"], "rate_per_identity": 0.5},
    }
    cfg = build_config(raw)
    assert cfg.tls == TlsConfig(
        edge=True, internal=True, ca=Path("/etc/certs/ca.pem"), edge_cert=Path("e.pem"), edge_key=Path("e.key"),
        names=("a",),
    )  # fmt: skip
    assert cfg.limits.trusted_proxies == ("envoy", "10.0.0.0/8") and cfg.limits.exempt == ()
    assert build_config(dump_config(cfg)) == cfg  # what ingest hands its worker processes
    assert tls.files(cfg).edge_cert == tmp_path / "e.pem"  # relative paths are in the data dir
    assert build_config({}).limits == LimitsConfig()
