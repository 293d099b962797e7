"""The generated Envoy config: what it routes where, its limits and timeouts, `envoy --mode validate`, the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common import tls
from services.common.config import build_config
from services.common.errors import InvalidInput
from services.common.net import REPO_ROOT as ROOT
from services.edge.__main__ import main as edge_main
from services.edge.envoy import (
    LONG_POLL_MARGIN,
    TRANSCODER,
    LuaPart,
    build_envoy_config,
    lua_script,
    read_services,
    render,
    write_envoy_config,
)
from tests.gateway import DESCRIPTOR, validate_envoy_config

GEN = ROOT / "protos" / "gen.py"
SERVICES = {
    "gridstor.v1.AuthService": "auth",
    "gridstor.v1.IngestService": "ingest",
    "gridstor.v1.MetaService": "meta",
    "gridstor.v1.SshService": "ssh",
    "gridstor.v1.MaintService": "maint",
}
INTERNAL = {"PutRecord", "FindByHash", "GetRecord", "UpdateRecord", "ListRecords", "AddExtension"}
ENVOY_DEFAULT_ROUTE_TIMEOUT = 15


def config(tmp_path: Path, **raw: Any) -> dict[str, Any]:
    return build_envoy_config(build_config({"data_dir": str(tmp_path), **raw}), DESCRIPTOR, 18080, 19901)


def hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    return dict(bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"])


def routes(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    return list(hcm(bootstrap)["route_config"]["virtual_hosts"][0]["routes"])


def route_for(bootstrap: dict[str, Any], path: str) -> dict[str, Any]:
    """The first route matching a gRPC request to ``path`` (Envoy's first-match order)."""
    for r in routes(bootstrap):
        m = r["match"]
        if m.get("path") == path or ("prefix" in m and path.startswith(m["prefix"])):
            return r
    raise AssertionError(f"no route for {path}")


def transcoder(bootstrap: dict[str, Any]) -> dict[str, Any]:
    return dict(next(f for f in hcm(bootstrap)["http_filters"] if f["name"].endswith("transcoder"))["typed_config"])


def test_services_and_methods_come_from_the_descriptor_set() -> None:
    found = {s.full_name: s for s in read_services(DESCRIPTOR)}
    assert {name: s.key for name, s in found.items()} == SERVICES
    meta = {m.name: m for m in found["gridstor.v1.MetaService"].methods}
    assert {n for n, m in meta.items() if not m.public} == INTERNAL
    assert meta["Download"].server_streaming and meta["Download"].bindings[0].path == "/v1/files/{id}"
    assert [b.verb for b in meta["Download"].bindings] == ["GET", "HEAD"]  # HEAD: a custom binding


def test_transcoder_settings_follow_envoy_notes(tmp_path: Path) -> None:
    t = transcoder(config(tmp_path))
    assert sorted(t["services"]) == sorted(SERVICES)
    assert t["proto_descriptor"] == str(DESCRIPTOR)
    assert t["convert_grpc_status"] is True
    assert t["request_validation_options"] == {"reject_unknown_method": True, "reject_unknown_query_parameters": True}
    assert t["print_options"] == {"always_print_primitive_fields": True, "preserve_proto_field_names": True}
    h = hcm(config(tmp_path))
    assert h["http_protocol_options"] == {"enable_trailers": True}
    assert [f["name"] for f in h["http_filters"]][-2:] == [
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]


def test_every_public_method_routes_to_its_service_and_internal_ones_are_refused(tmp_path: Path) -> None:
    boot = config(tmp_path)
    for svc in read_services(DESCRIPTOR):
        for m in svc.methods:
            r = route_for(boot, m.path)
            if m.public:
                assert r["route"]["cluster"] == f"gridstor_{svc.key}", m.path
                assert r["match"]["grpc"] == {}
            else:
                assert r["direct_response"]["status"] == 403, m.path
                assert "internal" in r["direct_response"]["body"]["inline_string"]


def test_one_http2_cluster_per_service_at_the_configured_address(tmp_path: Path) -> None:
    boot = config(tmp_path, listen_host="0.0.0.0", ports={"meta": 9103})
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    assert set(clusters) == {f"gridstor_{k}" for k in SERVICES.values()}
    meta = clusters["gridstor_meta"]
    address = meta["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {"address": "127.0.0.1", "port_value": 9103}  # a wildcard listen address dials loopback
    assert meta["type"] == "STATIC"
    options = meta["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    named = build_envoy_config(
        build_config({"data_dir": str(tmp_path), "hosts": {"meta": "meta", "auth": "10.0.0.5"}}), DESCRIPTOR
    )
    by_name = {c["name"]: c for c in named["static_resources"]["clusters"]}
    assert by_name["gridstor_meta"]["type"] == "STRICT_DNS"
    assert by_name["gridstor_auth"]["type"] == "STATIC"


def test_timeouts_suit_uploads_downloads_and_long_polls(tmp_path: Path) -> None:
    boot = config(tmp_path, status_max_wait=120)
    for path in ("/gridstor.v1.IngestService/Upload", "/gridstor.v1.MetaService/Download"):
        assert route_for(boot, path)["route"]["timeout"] == "0s", path
    status = route_for(boot, "/gridstor.v1.IngestService/Status")["route"]
    wait = 120 + LONG_POLL_MARGIN
    assert status["timeout"] == status["idle_timeout"] == f"{wait}s"
    assert wait > ENVOY_DEFAULT_ROUTE_TIMEOUT
    assert route_for(boot, "/gridstor.v1.AuthService/PublicKey")["route"]["timeout"] == "60s"
    h = hcm(boot)
    assert h["stream_idle_timeout"] == "300s"
    # A gRPC client's own deadline is honoured (capped) instead of the route's.
    assert status["max_stream_duration"]["grpc_timeout_header_max"] == "3600s"


def lua_code(boot: dict[str, Any]) -> str:
    lua = next(f for f in hcm(boot)["http_filters"] if f["name"] == "envoy.filters.http.lua")
    return str(lua["typed_config"]["default_source_code"]["inline_string"])


def test_lua_filter_parts_use_the_limits(tmp_path: Path) -> None:
    boot = config(tmp_path, max_upload="5MB", limits={"edge_max_request_headers_kb": 20})
    code = lua_code(boot)
    assert "local upload_limit = 5000000" in code
    assert '["/v1/files"] = true' in code and '["POST"] = true' in code and '["PUT"] = true' in code
    assert "local header_limit = 20480" in code
    # named parts, run in order by the two entry points
    assert "local request_checks = {mark_rest_request, check_header_size, check_upload_length}" in code
    assert "local response_fixes = {apply_http_status, apply_content_length, strip_grpc_headers}" in code
    assert hcm(boot)["http_filters"][0]["name"] == "envoy.filters.http.lua"  # before the transcoder
    # Envoy's codec stops at twice the limit, so the filter answers what lies between
    assert hcm(boot)["max_request_headers_kb"] == 40


def test_lua_script_refuses_a_part_of_unknown_phase() -> None:
    with pytest.raises(InvalidInput, match="unknown phase"):
        lua_script([LuaPart("x", "sometime", "local function x(handle) end")])


def test_rest_parts_of_the_lua_filter(tmp_path: Path) -> None:
    code = lua_code(config(tmp_path))
    assert 'string.match(status, "^[2-5]%d%d$")' in code  # Download's 206 and 304 as well as errors
    assert 'headers:remove("x-envoy-original-method")' in code  # meta trusts only the transcoder's
    for name in ("grpc-status", "grpc-message", "grpc-status-details-bin", "grpc-accept-encoding"):
        assert f'"{name}"' in code


def test_upload_page_routes_come_first_where_uploads_are_served(tmp_path: Path) -> None:
    boot = config(tmp_path, mode="allowlist", allowlist={"alice": "ab" * 32})
    page = [r for r in routes(boot) if "direct_response" in r and r["direct_response"]["status"] == 200]
    assert [r["match"]["path"] for r in page] == ["/", "/upload.js", "/upload.css"]
    assert routes(boot)[: len(page)] == page
    html = page[0]["direct_response"]["body"]["inline_string"]
    assert 'data-mode="allowlist"' in html and "{{mode}}" not in html
    for r in page:
        assert r["typed_per_filter_config"][TRANSCODER]["disabled"] is True
        size = len(r["direct_response"]["body"]["inline_string"].encode())
        assert size <= hcm(boot)["route_config"]["max_direct_response_body_size_bytes"]
    replica = build_envoy_config(build_config({"data_dir": str(tmp_path)}), DESCRIPTOR, only=["auth", "meta", "maint"])
    assert not any(r["match"].get("path") == "/" for r in routes(replica))  # no uploads there, no page


def test_admin_is_loopback_only_or_absent(tmp_path: Path) -> None:
    boot = config(tmp_path, listen_host="0.0.0.0")
    assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}
    none = build_envoy_config(build_config({"data_dir": str(tmp_path)}), DESCRIPTOR, 18080, None)
    assert "admin" not in none
    assert none["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_only_some_services(tmp_path: Path) -> None:
    boot = build_envoy_config(build_config({"data_dir": str(tmp_path)}), DESCRIPTOR, only=["auth", "meta", "maint"])
    assert sorted(transcoder(boot)["services"]) == [
        "gridstor.v1.AuthService",
        "gridstor.v1.MaintService",
        "gridstor.v1.MetaService",
    ]
    assert "check_upload_length" not in lua_code(boot)  # no upload there
    assert "local request_checks = {mark_rest_request, check_header_size}" in lua_code(boot)
    with pytest.raises(InvalidInput, match="nosuch"):
        build_envoy_config(build_config({"data_dir": str(tmp_path)}), DESCRIPTOR, only=["nosuch"])


def test_a_bad_descriptor_is_a_clear_error(tmp_path: Path) -> None:
    cfg = build_config({"data_dir": str(tmp_path)})
    with pytest.raises(InvalidInput, match="cannot read"):
        build_envoy_config(cfg, tmp_path / "missing.pb")
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\xff\xff not a descriptor")
    with pytest.raises(InvalidInput, match="FileDescriptorSet"):
        build_envoy_config(cfg, junk)


def test_generated_config_validates_with_real_envoy(tmp_path: Path) -> None:
    cfg = build_config({"data_dir": str(tmp_path)})
    tls.ensure_local(cfg)  # TLS is on by default: Envoy loads the certificate files
    out = write_envoy_config(cfg, DESCRIPTOR, tmp_path / "envoy.yaml", 18080, 19901)
    assert out.read_text().startswith("# Envoy bootstrap")
    assert render(build_envoy_config(cfg, DESCRIPTOR, 18080, 19901)) == out.read_text()  # deterministic
    done = validate_envoy_config(out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout


def test_cli_writes_checks_and_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gw = tmp_path / "gridstor.yaml"
    gw.write_text(f"data_dir: {tmp_path}\nmax_upload: 1MB\n")
    tls.ensure_local(build_config({"data_dir": str(tmp_path)}))
    out = tmp_path / "envoy.yaml"
    assert edge_main(["--config", str(gw), "--out", str(out), "--validate", "--admin-port", "19901"]) == 0
    assert "local upload_limit = 1000000" in out.read_text()
    assert edge_main(["--config", str(gw), "--out", str(out), "--check", "--admin-port", "19901"]) == 0
    gw.write_text(f"data_dir: {tmp_path}\nmax_upload: 2MB\n")
    assert edge_main(["--config", str(gw), "--out", str(out), "--check", "--admin-port", "19901"]) == 1
    assert "differs" in capsys.readouterr().err
    gw.write_text("mode: nonsense\n")
    assert edge_main(["--config", str(gw), "--out", str(out)]) == 2
    assert "mode" in capsys.readouterr().err


def run_gen(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GEN), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def test_gen_writes_and_drift_checks_the_compose_envoy_configs(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "compose", tmp_path / "compose")
    assert run_gen("--check", "--root", tmp_path).returncode == 0
    gw = tmp_path / "compose" / "gridstor.yaml"
    gw.write_text(gw.read_text().replace("max_upload: 100MB", "max_upload: 200MB"))
    result = run_gen("--check", "--root", tmp_path)
    assert result.returncode == 1
    assert "changed  compose/envoy/envoy.yaml" in result.stderr
    assert "envoy-replica.yaml" not in result.stderr
    assert run_gen("--root", tmp_path).returncode == 0
    assert "local upload_limit = 200000000" in (tmp_path / "compose/envoy/envoy.yaml").read_text()
    assert run_gen("--check", "--root", tmp_path).returncode == 0
    gw.write_text(gw.read_text().replace("role: master", "role: boss"))
    result = run_gen("--check", "--root", tmp_path)
    assert result.returncode == 2 and "role" in result.stderr


def test_compose_envoy_config_is_checked_in_up_to_date() -> None:
    text = (ROOT / "compose/envoy/envoy.yaml").read_text()
    boot = yaml.safe_load(text)
    assert boot["static_resources"]["listeners"][0]["address"]["socket_address"] == {
        "address": "0.0.0.0",
        "port_value": 8080,
    }
    result = run_gen("--check")
    assert result.returncode == 0, result.stderr
