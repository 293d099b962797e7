"""The gateway config: every setting is described, read, written back and shown; messages name the setting."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.config import RENAMED, Config, ConfigError, build_config, dump_config, load_config
from services.common.config_text import default_yaml, markdown
from services.common.setting import Field, walk

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDERS = ("See services/", "TODO", "FIXME", "XXX", "...", "…", "<", "TBD")


def non_default(tmp_path: Path) -> dict[str, Any]:
    """A value other than the default for every setting (a new setting must be added here)."""
    d = tmp_path / "gw"
    return {
        "data_dir": str(d),
        "mode": "allowlist",
        "secret": "s" * 20,
        "allowlist": {"alice": "AB" * 32},
        "token_ttl": 3600,
        "auth_skew": 30,
        "listen_host": "10.1.2.3",
        "ports": {"meta": 9103},
        "metrics_port_offset": 50,
        "redis": "redis://127.0.0.1:6390/2",
        "engine": {
            "k": 4, "m": 2, "chunk_size": "1MiB", "ec_type": "liberasurecode_rs_vand", "write_ahead": 3,
            "read_ahead": 4, "read_slots": 2, "hedge_after": 0.5, "shard_timeout": 5, "backend_cooldown": 7.5,
            "write_quorum": 5,
        },
        "backends": [f"dir://{d}/s{i}" for i in range(5)] + [{"name": "last", "uri": f"dir://{d}/s5"}],
        "metadata": {
            "uri": f"dir://{d}/replica", "index_uri": f"dir://{d}/index", "replicas": [f"dir://{d}/r2"],
            "mode": "user", "master": "zdb://m1:9900/meta", "sync_interval": 3, "verify_interval": 0,
        },
        "max_upload": "5MB",
        "workers": 3,
        "status_max_wait": 60,
        "outage_wait": 90,
        "role": "replica",
        "maint": {
            "scrub_interval": 0, "scrub_files_per_second": 2.5, "scrub_bytes_per_second": "1MB", "hard_every": 2,
            "cleanup_interval": 60, "backup_interval": 0, "compact_interval": 0, "compact_min_dead": 0.5,
            "orphan_interval": 60, "orphan_grace": 0, "rebuild_unreachable_after": 600,
        },
        "admins": ["alice"],
        "envoy_port": 18080,
        "ssh": {
            "port": 2022, "listen_host": "127.0.0.2", "homes_dir": "h", "default_max_size": "500MB",
            "rrsync": "/opt/rrsync", "max_entries": 5000, "login_timeout": 5, "max_unauthenticated": 7,
            "max_unauthenticated_per_address": 3, "ciphers": ["aes256-gcm@openssh.com"],
        },
        "hosts": {"meta": "meta.internal"},
        "tls": {
            "edge": False, "internal": True, "ca": "c/ca.pem", "cert": "c/s.pem", "key": "c/s.key",
            "edge_cert": "/le/full.pem", "edge_key": "/le/key.pem", "names": ["[::1]", "gw.example.org"],
        },
        "limits": {
            "uploads_per_identity": 1, "uploads_per_address": 0, "rate_per_identity": 0.5, "burst_per_identity": 5,
            "rate_per_address": 0, "burst_per_address": 7, "upload_idle_timeout": 9, "exempt": [],
            "trusted_proxies": ["envoy", "10.0.0.0/8"], "edge_max_connections": 10, "edge_streams_per_connection": 3,
            "edge_max_request_headers_kb": 64, "edge_request_headers_timeout": 2, "edge_idle_timeout": 30,
            "downloads_per_process": 3, "uploads_per_process": 0, "upload_window": "256KiB", "busy_wait": 5,
            "download_read_ahead": "8MiB",
        },
    }  # fmt: skip


def leaves() -> list[tuple[str, Field]]:
    return [(path, f) for path, f in walk(Config) if f.section is None]


def lookup(obj: Any, path: str) -> Any:
    """The value at a dotted path of a Config (YAML keys) or of a mapping."""
    for key in path.split("."):
        if isinstance(obj, dict):
            obj = obj[key]
        else:
            obj = getattr(obj, next(f.name for _, f in walk(type(obj)) if f.key == key))
    return obj


def test_every_setting_has_a_one_line_description() -> None:
    for path, f in walk(Config):
        text = f.setting.help
        assert text and "\n" not in text and len(text) < 200, path
        assert not any(p in text for p in PLACEHOLDERS), (path, text)


def test_every_setting_is_read_and_round_trips_through_yaml(tmp_path: Path) -> None:
    raw = non_default(tmp_path)
    assert {path for path, _ in leaves()} == {path for path, _ in _flatten(raw)}
    cfg = build_config(raw, env={})
    default = build_config({}, env={})
    for path, _ in leaves():
        assert lookup(cfg, path) != lookup(default, path), f"{path} was accepted but not read"
    text = yaml.safe_dump(dump_config(cfg))
    assert build_config(yaml.safe_load(text), env={}) == cfg
    assert build_config(dump_config(default), env={}) == default


def _flatten(raw: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    sections = {path for path, f in walk(Config) if f.section is not None}
    out = []
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if path in sections:
            out += _flatten(value, f"{path}.")
        else:
            out.append((path, value))
    return out


def test_the_default_yaml_shows_and_describes_every_setting(tmp_path: Path) -> None:
    text = default_yaml(tmp_path)
    comments = " ".join(line.strip().removeprefix("#").strip() for line in text.splitlines() if "#" in line)
    comments = " ".join(comments.split())
    loaded = yaml.safe_load(text)
    for path, f in walk(Config):
        lookup(loaded, path)  # present
        assert " ".join(f.setting.help.split()) in comments, path
        if f.setting.env:
            assert f.setting.env in comments, path
    assert not any(p in text for p in PLACEHOLDERS)
    assert build_config(loaded, env={}) == build_config({}, data_dir=tmp_path, env={})


def test_the_docs_table_is_up_to_date() -> None:
    assert (ROOT / "docs" / "config.md").read_text() == markdown(), "run `make gen` and commit docs/config.md"
    for path, _ in walk(Config):
        assert f"`{path}`" in markdown()


def test_environment_overrides_win(tmp_path: Path) -> None:
    raw = non_default(tmp_path)
    cfg = build_config(raw, env={})
    plain = dict(raw, ssh={}, mode="public", listen_host="127.0.0.1", redis="", admins=[])
    for path, f in walk(Config):
        if not f.setting.env:
            continue
        value = lookup(raw, path)
        got = build_config(plain, env={f.setting.env: str(value)})
        assert lookup(got, path) == lookup(cfg, path), path
    assert build_config({"data_dir": str(tmp_path)}, env={"GRIDSTOR_SSH_PORT": ""}).ssh.port == 2222  # "" = unset
    with pytest.raises(ConfigError) as info:
        build_config({"data_dir": str(tmp_path)}, env={"GRIDSTOR_SSH_PORT": "70000"})
    assert str(info.value) == (
        "config: GRIDSTOR_SSH_PORT (ssh.port): must be an integer between 0 and 65535, got 70000"
    )
    with pytest.raises(ConfigError, match=r"GRIDSTOR_SSH_DEFAULT_MAX \(ssh.default_max_size\): expected a size"):
        build_config({"data_dir": str(tmp_path)}, env={"GRIDSTOR_SSH_DEFAULT_MAX": "lots"})
    data = build_config({}, data_dir=tmp_path / "arg", env={"GRIDSTOR_DATA_DIR": str(tmp_path / "env")})
    assert data.data_dir == tmp_path / "env" and data.ssh.homes_dir == tmp_path / "env" / "homes"


def test_defaults_derived_from_the_data_dir(tmp_path: Path) -> None:
    cfg = build_config({"redis": ""}, data_dir=tmp_path, env={})
    assert cfg.redis_url == f"unix://{tmp_path}/redis.sock"
    assert cfg.metadata.uri == f"dir://{tmp_path}/meta/records"
    assert cfg.backends[19].uri == f"dir://{tmp_path}/backends/b19"
    assert cfg.ssh.homes_dir == tmp_path / "homes"
    assert build_config({"ssh": {"homes_dir": "/srv/homes"}}, data_dir=tmp_path).ssh.homes_dir == Path("/srv/homes")
    # metadata without a uri keeps the derived one (a replica list alone is enough)
    assert build_config({"metadata": {"replicas": ["dir:///r"]}}, data_dir=tmp_path).metadata.uri == cfg.metadata.uri


def test_the_old_ssh_names_still_work_for_a_release(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = {"ssh_port": 2200, "ssh_listen_host": "::1", "homes_dir": "rel", "ssh_default_max_size": "2GB",
           "rrsync": "/x/rrsync"}  # fmt: skip
    assert set(old) == set(RENAMED)
    with caplog.at_level(logging.WARNING, logger="services.common.config"):
        cfg = build_config({"data_dir": str(tmp_path), **old}, env={})
    assert (cfg.ssh.port, cfg.ssh.listen_host, cfg.ssh.default_max_size, cfg.ssh.rrsync) == (
        2200, "::1", 2 * 10**9, "/x/rrsync",
    )  # fmt: skip
    assert cfg.ssh.homes_dir == Path("rel").absolute()  # the old name was relative to the working dir
    assert "config: ssh_port is deprecated; write it as ssh.port" in caplog.text
    assert len(caplog.records) == len(RENAMED)
    with pytest.raises(ConfigError) as info:
        build_config({"ssh_port": 2200, "ssh": {"port": 2201}})
    assert str(info.value).startswith("config: ssh_port: the config sets both ssh_port (the old name) and ssh.port")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"redis_url": "redis://x:1/0"}, "config: unknown setting(s) redis_url (redis_url: write redis); known: "),
        ({"nonsense": 1}, "config: unknown setting(s) nonsense; known: admins, allowlist"),
        ({"engine": {"k": 0}}, "config: engine.k: must be an integer >= 1, got 0"),
        ({"engine": {"k": "many"}}, "config: engine.k: expected an integer, got str 'many'"),
        ({"engine": {"chunk_size": 1024}}, "config: engine: chunk_size must be between 4096 and"),
        ({"engine": {"hedge_after": 0}}, "config: engine.hedge_after: must be positive"),
        ({"engine": {"speed": 1}}, "config: engine: unknown setting(s) speed"),
        ({"engine": []}, "config: engine: expected a mapping, got list []"),
        ({"mode": "sideways"}, "config: mode: must be one of public, secret, allowlist, got 'sideways'"),
        ({"mode": "secret", "secret": "short"}, "config: secret: mode 'secret' needs a shared secret"),
        ({"mode": "allowlist"}, "config: allowlist: mode 'allowlist' needs at least one identity"),
        ({"allowlist": {"a b": "00" * 32}}, "config: allowlist.a b: identity must be 1-64 of"),
        ({"allowlist": {"bob": "xyz"}}, "config: allowlist.bob: expected an ed25519 public key as 64 hex"),
        ({"ports": {"web": 1}}, "config: ports.web: unknown service; known: auth, ingest, meta, ssh, maint"),
        ({"ports": {"meta": 7101}}, "config: ports: two services share a port"),
        ({"ports": {"meta": 0}}, "config: ports.meta: must be an integer between 1 and 65535, got 0"),
        ({"envoy_port": 7101}, "config: envoy_port: 7101 is also the port of a service"),
        ({"ssh": {"port": 8080}}, "config: ssh.port: 8080 is also the port of another service"),
        ({"ssh": {"default_max_size": 0}}, "config: ssh.default_max_size: must be more than 0 bytes"),
        ({"redis": "http://x"}, "config: redis: expected redis://host:port/db or unix:///path, got 'http://x'"),
        ({"role": "boss"}, "config: role: must be master or replica, got 'boss'"),
        ({"metadata": {"mode": "user"}}, "config: metadata.mode: a master gateway allocates metadata ids"),
        ({"metadata": {"mode": "odd"}}, "config: metadata.mode: must be seq or user, got 'odd'"),
        ({"metadata": {"replicas": ["nope://x"]}}, "config: metadata.replicas[0]: "),
        ({"backends": ["dir:///a"] * 20}, "config: backends: the same URI is listed twice"),
        (
            {"backends": [{"name": "x", "uri": "dir:///a"}, {"name": "x", "uri": "dir:///b"}]},
            "config: backends: duplicate name(s) x",
        ),
        ({"backends": ["dir:///a"]}, "config: backends: 1 configured, 16+4 coding needs at least 20"),
        ({"backends": [{"name": "b 1", "uri": "dir:///a"}]}, "config: backends[0].name: 'b 1' must be 1-64 of"),
        ({"admins": ["ok", "not ok"]}, "config: admins[1]: identity must be 1-64 of letters"),
        (
            {"admins": ["ops"]},
            "config: admins: mode 'public' does not prove identities (anyone may log in under any name), so listing"
            " admins would make anyone an admin: remove admins and use `gridstor admin token` on the gateway"
            " machine, or use mode 'allowlist', where identities are proven by their keys",
        ),
        ({"mode": "secret", "secret": "s" * 16, "admins": ["ops"]}, "config: admins: mode 'secret' does not prove"),
        ({"hosts": {"meta": "a/b"}}, "config: hosts.meta: 'a/b' is not a host name or address"),
        ({"maint": {"scrub_bytes_per_second": 0}}, "config: maint.scrub_bytes_per_second: must be more than 0"),
        ({"maint": {"scrub_interval": -1}}, "config: maint.scrub_interval: must be >= 0 (0 = off), got -1"),
        ({"maint": {"compact_min_dead": 2}}, "config: maint.compact_min_dead: must be a fraction between 0 and 1"),
        ({"limits": {"busy_wait": 0}}, "config: limits.busy_wait: must be positive"),
        ({"max_upload": "lots"}, "config: max_upload: expected a size like 100MB or 4MiB, got 'lots'"),
        ({"data_dir": 5}, "config: data_dir: expected a folder path, got int 5"),
        ({"ssh_port": 1, "ssh": {"port": 2}}, "config: ssh_port: the config sets both"),
    ],
)
def test_bad_values_are_named(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(raw, env={})
    assert str(info.value).startswith(message), str(info.value)


def test_a_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping of settings, got list"):
        load_config(path)
    path.write_text("engine: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)
    assert re.search("cannot read", _error(lambda: load_config(tmp_path / "missing.yaml")))


def _error(fn: Any) -> str:
    with pytest.raises(ConfigError) as info:
        fn()
    return str(info.value)
