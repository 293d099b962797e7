"""The generated Envoy config's TLS and limits: what it says, and that a real Envoy accepts it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from services.common import tls
from services.common.config import build_config
from services.edge.envoy import build_envoy_config, envoy_binary, write_envoy_config
from tests.gateway import DESCRIPTOR


def listener(boot: dict[str, Any]) -> dict[str, Any]:
    return dict(boot["static_resources"]["listeners"][0])


def hcm_of(chain: dict[str, Any]) -> dict[str, Any]:
    return dict(chain["filters"][0]["typed_config"])


def validate(path: Path) -> None:
    binary = envoy_binary()
    assert binary is not None
    done = subprocess.run(
        [str(binary), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "--log-level", "error"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_tls_edge_serves_h2_and_http1_and_answers_plain_text_itself(tmp_path: Path) -> None:
    cfg = build_config({"data_dir": str(tmp_path)})
    tls.ensure_local(cfg)
    boot = build_envoy_config(cfg, DESCRIPTOR, 18443, 19901)
    lst = listener(boot)
    assert [f["name"] for f in lst["listener_filters"]] == ["envoy.filters.listener.tls_inspector"]
    secure, plain = lst["filter_chains"]
    assert secure["filter_chain_match"] == {"transport_protocol": "tls"}
    ctx = secure["transport_socket"]["typed_config"]["common_tls_context"]
    assert ctx["alpn_protocols"] == ["h2", "http/1.1"]
    assert ctx["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    assert ctx["tls_certificates"] == [
        {"certificate_chain": {"filename": str(tmp_path / "tls/server.pem")},
         "private_key": {"filename": str(tmp_path / "tls/server.key")}}
    ]  # fmt: skip
    # Plain text never reaches a service: only direct answers saying to use TLS.
    assert plain["filter_chain_match"] == {"transport_protocol": "raw_buffer"}
    routes = hcm_of(plain)["route_config"]["virtual_hosts"][0]["routes"]
    assert all("direct_response" in r and "route" not in r for r in routes)
    grpc_route = next(r for r in routes if r["match"].get("grpc") == {})
    assert {"header": {"key": "grpc-status", "value": "14"}} in grpc_route["response_headers_to_add"]
    # The services are plain on loopback by default: no upstream TLS.
    assert all("transport_socket" not in c for c in boot["static_resources"]["clusters"])
    validate(write_envoy_config(cfg, DESCRIPTOR, tmp_path / "envoy.yaml", 18443, 19901))


def test_internal_tls_verifies_each_service_by_name(tmp_path: Path) -> None:
    cfg = build_config({"data_dir": str(tmp_path), "tls": {"internal": True}, "hosts": {"meta": "meta.internal"}})
    tls.ensure_local(cfg)
    boot = build_envoy_config(cfg, DESCRIPTOR, 18443)
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    meta = clusters["gridstor_meta"]["transport_socket"]["typed_config"]
    assert meta["sni"] == "meta.internal"
    validation = meta["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": str(tmp_path / "tls/ca.pem")}
    assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "meta.internal"}}]
    auth = clusters["gridstor_auth"]["transport_socket"]["typed_config"]
    assert "sni" not in auth  # an address: matched as an IP SAN, no SNI
    assert auth["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0]["san_type"] == (
        "IP_ADDRESS"
    )
    assert auth["common_tls_context"]["alpn_protocols"] == ["h2"]
    validate(write_envoy_config(cfg, DESCRIPTOR, tmp_path / "envoy.yaml", 18443, 19901))


def test_a_public_edge_certificate_is_envoys_alone(tmp_path: Path) -> None:
    cfg = build_config(
        {"data_dir": str(tmp_path), "tls": {"edge_cert": "/le/fullchain.pem", "edge_key": "/le/key.pem"}}
    )
    ctx = listener(build_envoy_config(cfg, DESCRIPTOR))["filter_chains"][0]["transport_socket"]["typed_config"]
    assert ctx["common_tls_context"]["tls_certificates"][0] == {
        "certificate_chain": {"filename": "/le/fullchain.pem"},
        "private_key": {"filename": "/le/key.pem"},
    }


def test_edge_limits_come_from_the_config(tmp_path: Path) -> None:
    limits = {
        "edge_max_connections": 500,
        "edge_streams_per_connection": 16,
        "edge_max_request_headers_kb": 24,
        "edge_request_headers_timeout": 5,
        "edge_idle_timeout": 45.5,
    }
    cfg = build_config({"data_dir": str(tmp_path), "tls": {"edge": False}, "limits": limits})
    boot = build_envoy_config(cfg, DESCRIPTOR, 18080, 19901)
    lst = listener(boot)
    assert len(lst["filter_chains"]) == 1 and "listener_filters" not in lst  # plain HTTP: one chain
    assert lst["per_connection_buffer_limit_bytes"] == 1024 * 1024
    h = hcm_of(lst["filter_chains"][0])
    assert h["http2_protocol_options"]["max_concurrent_streams"] == 16
    # the limit clients see is checked by the Lua filter; Envoy's codec stops at twice that
    assert h["max_request_headers_kb"] == 48
    lua = h["http_filters"][0]["typed_config"]["default_source_code"]["inline_string"]
    assert f"local header_limit = {24 * 1024}" in lua
    assert h["request_headers_timeout"] == "5s"
    assert h["stream_idle_timeout"] == "45.5s"
    assert h["common_http_protocol_options"] == {"idle_timeout": "45.5s"}
    monitor = boot["overload_manager"]["resource_monitors"][0]["typed_config"]
    assert monitor["max_active_downstream_connections"] == 500
    # Unary routes keep a total timeout; streams rely on the idle timeout.
    routes = h["route_config"]["virtual_hosts"][0]["routes"]
    upload = next(r for r in routes if r["match"].get("path") == "/gridstor.v1.IngestService/Upload")
    assert upload["route"]["timeout"] == "0s"
    auth = next(r for r in routes if r["match"].get("prefix") == "/gridstor.v1.AuthService/")
    assert auth["route"]["timeout"] == "60s"
    validate(write_envoy_config(cfg, DESCRIPTOR, tmp_path / "envoy.yaml", 18080, 19901))
