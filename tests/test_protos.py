"""The service contracts (protos/gridstor/v1) and their one-command generator (protos/gen.py)."""

from __future__ import annotations

import importlib
import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor

from services.common.net import REPO_ROOT as ROOT

GEN = ROOT / "protos" / "gen.py"
PROTO_DIR = ROOT / "protos" / "gridstor" / "v1"
DESCRIPTOR_SET = ROOT / "compose" / "envoy" / "gridstor.pb"
PROTO_NAMES = sorted(p.stem for p in PROTO_DIR.glob("*.proto"))

# The methods the design names, per service (at least these).
REQUIRED_METHODS = {
    "AuthService": {"Authenticate", "PublicKey"},
    "IngestService": {"Upload", "Status"},
    "MetaService": {"Download", "Exists", "Stat", "PutRecord", "FindByHash", "GetRecord", "UpdateRecord"},
    "SshService": {"EnableAccount", "DisableAccount", "HomeSize", "Process"},
    "MaintService": {"Check", "Scrub", "Repair", "ReplicaStatus", "Backup", "Restore"},
}
# Service-to-service methods: never reachable through the REST edge.
INTERNAL_METHODS = {
    "MetaService": {"PutRecord", "FindByHash", "GetRecord", "UpdateRecord", "ListRecords", "AddExtension"}
}
VERBS = ("get", "put", "post", "delete", "patch")


def module(name: str) -> ModuleType:
    return importlib.import_module(f"gridstor.v1.{name}")


def services() -> dict[str, ServiceDescriptor]:
    found: dict[str, ServiceDescriptor] = {}
    for name in PROTO_NAMES:
        found.update(module(f"{name}_pb2").DESCRIPTOR.services_by_name)
    return found


def http_rule(method: MethodDescriptor) -> Any:
    """The method's google.api.http option (a google.api.HttpRule), or None."""
    from google.api import annotations_pb2

    options: Any = method.GetOptions()
    http: Any = annotations_pb2.http
    if not options.HasExtension(http):
        return None
    return options.Extensions[http]


def bindings(method: MethodDescriptor) -> list[tuple[str, str, str]]:
    """(verb, path template, body) of the method's main and additional HTTP bindings."""
    rule = http_rule(method)
    if rule is None:
        return []
    out = []
    for r in [rule, *rule.additional_bindings]:
        pattern = r.WhichOneof("pattern")
        if pattern == "custom":  # HEAD only: Envoy's transcoder (1.40) binds it, and sends no body back
            assert r.custom.kind == "HEAD", f"{method.full_name}: unsupported custom HTTP verb {r.custom.kind}"
            out.append(("HEAD", r.custom.path, r.body))
            continue
        assert pattern in VERBS, f"{method.full_name}: unsupported HTTP pattern {pattern}"
        out.append((pattern.upper(), getattr(r, pattern), r.body))
    return out


def all_bindings() -> list[tuple[str, str, str, MethodDescriptor]]:
    return [(verb, path, body, m) for s in services().values() for m in s.methods for verb, path, body in bindings(m)]


def segments(template: str) -> list[str]:
    """Path segments with every variable as "*" (or "**" for a multi-segment one)."""
    assert template.startswith("/"), template
    out = []
    for seg in template[1:].split("/"):
        var = re.fullmatch(r"\{([a-z_.]+)(?:=([^}]*))?\}", seg)
        out.append(seg if var is None else (var.group(2) or "*"))
    return out


def can_collide(a: str, b: str) -> bool:
    """Whether some URL path could match both templates."""
    sa, sb = segments(a), segments(b)
    if "**" in sa or "**" in sb:
        cut = min(i for i, s in enumerate([*sa, "**"]) if s == "**")
        cut = min(cut, min(i for i, s in enumerate([*sb, "**"]) if s == "**"))
        sa, sb = sa[:cut], sb[:cut]
    elif len(sa) != len(sb):
        return False
    return all(x == y or "*" in (x, y) for x, y in zip(sa, sb, strict=False))


def run_gen(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GEN), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


# --- the generated modules and the contracts ------------------------------------------------


@pytest.mark.parametrize("name", PROTO_NAMES)
def test_every_generated_module_imports(name: str) -> None:
    pb2 = module(f"{name}_pb2")
    assert pb2.DESCRIPTOR.name == f"gridstor/v1/{name}.proto"
    assert pb2.DESCRIPTOR.package == "gridstor.v1"
    grpc_mod = module(f"{name}_pb2_grpc")
    for service in pb2.DESCRIPTOR.services_by_name:
        assert hasattr(grpc_mod, f"{service}Stub")
        assert hasattr(grpc_mod, f"{service}Servicer")
        assert hasattr(grpc_mod, f"add_{service}Servicer_to_server")
    for suffix in ("_pb2.pyi", "_pb2_grpc.pyi"):
        assert (PROTO_DIR / f"{name}{suffix}").is_file()


def test_record_proto_keeps_its_fields() -> None:
    fields = {f.name: f.number for f in module("record_pb2").FileRecord.DESCRIPTOR.fields}
    assert fields == {
        "version": 1,
        "hash": 2,
        "size": 3,
        "ext": 4,
        "content_type": 5,
        "chunk_size": 6,
        "k": 7,
        "m": 8,
        "ec_type": 9,
        "wrapped_key": 10,
        "backends": 11,
        "chunks": 12,
        "created": 13,
        "cipher": 14,
        "other_types": 15,
        "backend_ids": 16,
    }
    shard = {f.name: f.number for f in module("record_pb2").ShardRef.DESCRIPTOR.fields}
    assert shard == {"backend": 1, "key": 2, "checksum": 3, "unwritten": 4}
    chunk = {f.name: f.number for f in module("record_pb2").ChunkRecord.DESCRIPTOR.fields}
    assert chunk == {"plain_size": 1, "cipher_size": 2, "shards": 3, "shard_size": 4}


def test_every_architecture_method_exists() -> None:
    found = services()
    for service, methods in REQUIRED_METHODS.items():
        assert service in found, f"service gridstor.v1.{service} is missing"
        missing = methods - set(found[service].methods_by_name)
        assert not missing, f"{service} lacks {sorted(missing)}"


def test_every_message_is_its_own() -> None:
    """Each RPC has its own request and reply message, so either can grow alone."""
    seen: dict[str, str] = {}
    for service in services().values():
        for m in service.methods:
            for msg in (m.input_type, m.output_type):
                if msg.full_name == "google.api.HttpBody":
                    continue
                assert msg.full_name not in seen, f"{msg.full_name} used by {seen[msg.full_name]} and {m.full_name}"
                seen[msg.full_name] = m.full_name


def test_public_methods_have_http_bindings_and_internal_ones_none() -> None:
    for name, service in services().items():
        internal = INTERNAL_METHODS.get(name, set())
        for m in service.methods:
            if m.name in internal:
                assert http_rule(m) is None, f"{m.full_name} is internal but has a REST binding"
            else:
                assert bindings(m), f"{m.full_name} has no google.api.http binding"


def test_rest_paths_cover_every_service_under_v1() -> None:
    by_service: dict[str, set[str]] = {}
    for _verb, path, _body, m in all_bindings():
        assert path.startswith("/v1/"), path
        by_service.setdefault(m.containing_service.name, set()).add(path)
    assert set(by_service) == set(services())
    assert all(p.startswith("/v1/ssh/") for p in by_service["SshService"])
    assert all(p.startswith("/v1/maint/") for p in by_service["MaintService"])


def test_no_two_http_bindings_share_verb_and_path() -> None:
    seen: dict[tuple[str, str], str] = {}
    for verb, path, _body, m in all_bindings():
        key = (verb, re.sub(r"\{[^}]*\}", "{}", path))
        assert key not in seen, f"{verb} {path}: bound by {seen[key]} and {m.full_name}"
        seen[key] = m.full_name


def test_no_two_http_bindings_can_match_the_same_request() -> None:
    """Stronger: no URL path matches two templates of one verb, whatever the ids look like."""
    for (v1, p1, _, m1), (v2, p2, _, m2) in itertools.combinations(all_bindings(), 2):
        if v1 == v2:
            assert not can_collide(p1, p2), f"{v1} {p1} ({m1.full_name}) overlaps {p2} ({m2.full_name})"


def test_collision_check_itself() -> None:
    assert can_collide("/v1/files/{id}", "/v1/files/abc.tar.gz")
    assert can_collide("/v1/a/{x=**}", "/v1/a/b/c")
    assert not can_collide("/v1/files/{id}", "/v1/files/{id}/exists")
    assert not can_collide("/v1/files/{id}/stat", "/v1/files/{id}/exists")


def test_http_bindings_name_real_fields() -> None:
    """Path variables and the body name fields of the request; GET and DELETE carry no body."""
    for verb, path, body, m in all_bindings():
        fields = m.input_type.fields_by_name
        for var in re.findall(r"\{([a-z_]+)", path):
            assert var in fields, f"{m.full_name}: {path} names no field {var}"
            assert fields[var].type == FieldDescriptor.TYPE_STRING, f"{m.full_name}: {var} must be a string"
        if verb in ("GET", "DELETE", "HEAD"):
            assert body == "", f"{m.full_name}: {verb} with a body"
        elif body not in ("", "*"):
            assert body in fields, f"{m.full_name}: body {body} is not a field"


def test_streaming_shapes_follow_envoy_notes() -> None:
    found = services()
    upload = found["IngestService"].methods_by_name["Upload"]
    assert upload.client_streaming and not upload.server_streaming
    body = upload.input_type.fields_by_name["body"].message_type
    assert body is not None and body.full_name == "google.api.HttpBody"
    assert {"name", "content_type", "declared_size"} <= set(upload.input_type.fields_by_name)
    assert bindings(upload) == [("POST", "/v1/files", "body"), ("PUT", "/v1/files", "body")]
    download = found["MetaService"].methods_by_name["Download"]
    assert download.server_streaming and not download.client_streaming
    assert download.output_type.full_name == "google.api.HttpBody"
    assert {"id", "offset", "length"} <= set(download.input_type.fields_by_name)
    assert bindings(download) == [("GET", "/v1/files/{id}", ""), ("HEAD", "/v1/files/{id}", "")]
    status = found["IngestService"].methods_by_name["Status"]
    assert bindings(status) == [("GET", "/v1/jobs/{job}", "")]
    states = {v.name for v in module("common_pb2").JobState.DESCRIPTOR.values}
    assert {"JOB_STATE_ACTIVE", "JOB_STATE_TIMEOUT", "JOB_STATE_ERROR", "JOB_STATE_DONE"} <= states


def test_descriptor_set_serves_envoy() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    names = [f.name for f in fds.file]
    assert len(names) == len(set(names))
    for needed in ("google/api/annotations.proto", "google/api/httpbody.proto", "google/rpc/error_details.proto"):
        assert needed in names
    assert {f"gridstor/v1/{n}.proto" for n in PROTO_NAMES} <= set(names)
    in_set = {f"{f.package}.{s.name}": {m.name for m in s.method} for f in fds.file for s in f.service}
    runtime = {s.full_name: set(s.methods_by_name) for s in services().values()}
    assert in_set == runtime
    assert all(f.HasField("source_code_info") for f in fds.file), "built without --include_source_info"


# --- the generator ------------------------------------------------------------------------------


def test_generated_code_is_up_to_date() -> None:
    result = run_gen("--check")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the repo's protos and descriptor set that a test may change."""
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "compose" / "envoy").mkdir(parents=True)
    shutil.copy2(DESCRIPTOR_SET, tmp_path / "compose" / "envoy" / "gridstor.pb")
    result = run_gen("--check", "--root", tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path


def test_check_reports_a_changed_comment(tree: Path) -> None:
    proto = tree / "protos/gridstor/v1/meta.proto"
    proto.write_text(proto.read_text().replace("// File id, with or without its extension.", "// Changed.", 1))
    result = run_gen("--check", "--root", tree)
    assert result.returncode == 1
    # Comments reach the typed stubs and the descriptor set (source info), not the runtime module.
    assert "changed  protos/gridstor/v1/meta_pb2.pyi" in result.stderr
    assert "changed  compose/envoy/gridstor.pb" in result.stderr
    assert "meta_pb2.py\n" not in result.stderr
    assert "make gen" in result.stderr


def test_check_reports_a_new_field_and_gen_fixes_it(tree: Path) -> None:
    proto = tree / "protos/gridstor/v1/ssh.proto"
    text = proto.read_text()
    proto.write_text(text.replace("  uint32 max_size_mb = 3;\n", "  uint32 max_size_mb = 3;\n  string note = 9;\n", 1))
    before = {p: p.read_bytes() for p in (tree / "protos").rglob("*_pb2.py")}
    result = run_gen("--check", "--root", tree)
    assert result.returncode == 1
    assert "changed  protos/gridstor/v1/ssh_pb2.py" in result.stderr
    assert {p for p in (tree / "protos").rglob("*_pb2.py") if p.read_bytes() != before[p]} == set(), "--check wrote"
    assert run_gen("--root", tree).returncode == 0
    assert run_gen("--check", "--root", tree).returncode == 0
    assert b"note" in (tree / "protos/gridstor/v1/ssh_pb2.py").read_bytes()


def test_check_reports_stale_and_missing_files(tree: Path) -> None:
    v1 = tree / "protos/gridstor/v1"
    (v1 / "ssh.proto").unlink()  # its four generated files are now stale
    (v1 / "auth_pb2_grpc.pyi").unlink()
    result = run_gen("--check", "--root", tree)
    assert result.returncode == 1
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
        assert f"stale    protos/gridstor/v1/ssh{suffix}" in result.stderr
    assert "missing  protos/gridstor/v1/auth_pb2_grpc.pyi" in result.stderr
    assert run_gen("--root", tree).returncode == 0
    assert not list(v1.glob("ssh_*")) and (v1 / "auth_pb2_grpc.pyi").is_file()
    assert run_gen("--check", "--root", tree).returncode == 0


def test_generation_is_deterministic(tree: Path) -> None:
    files = sorted(p for p in tree.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    before = {p: p.read_bytes() for p in files}
    for p in files:
        if p.suffix in (".py", ".pyi", ".pb") and p.name != "gen.py":
            p.unlink()
    assert run_gen("--root", tree).returncode == 0
    after = {p: p.read_bytes() for p in sorted(q for q in tree.rglob("*") if q.is_file())}
    assert after == before
