"""The gateway configuration: one YAML file, validated at start.

Each setting is defined once, below (and ``EngineConfig`` in engine.py): its type,
default, one-line description, check and ``GRIDSTOR_*`` environment override, as a
``setting()`` field (services/common/setting.py). ``build_config`` reads a YAML mapping
through those fields, ``dump_config`` writes a Config back; the default YAML that
``make up`` writes and docs/config.md (the table of every setting; ``make gen``) are
rendered from the same fields by services/common/config_text.py.

Every default works on one machine (``make up``): 20 dir backends under the data dir,
metadata in a dir store, public mode on 127.0.0.1. A wrong or unknown setting stops the
start with a message naming it, e.g. ``config: engine.k: must be an integer >= 1``.

Environment overrides: a setting with ``env=`` is overridden by that variable (the
environment wins over the file; an empty variable counts as unset). They all live here;
docs/config.md lists them in its Env column.

Renamed settings (``RENAMED``): the old top-level SSH names (``ssh_port``, ...) are read
for one more release, with a warning naming the new key in the ``ssh:`` section; a
config that sets both the old and the new name is refused.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.common.engine import EngineConfig
from services.common.setting import (
    NAME_RE,
    Address,
    AutoFlag,
    BackendUri,
    CertName,
    Check,
    Choice,
    ConfigError,
    Context,
    FilePath,
    Flag,
    Folder,
    HexKey,
    Host,
    Int,
    ListOf,
    MapOf,
    Name,
    Number,
    RedisUrl,
    Service,
    Size,
    Text,
    dump_section,
    expect,
    fail,
    parse_size,
    read_section,
    read_setting,
    section,
    setting,
)

__all__ = [
    "DEFAULT_PORTS",
    "MODES",
    "RENAMED",
    "SERVICES",
    "BackendSpec",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "MaintConfig",
    "MetadataConfig",
    "SshConfig",
    "TlsConfig",
    "build_config",
    "default_backends",
    "dump_config",
    "is_loopback",
    "load_config",
    "parse_size",
]

log = logging.getLogger(__name__)

MODES = ("public", "secret", "allowlist")
SERVICES = ("auth", "ingest", "meta", "ssh", "maint")
DEFAULT_PORTS = {"auth": 7101, "ingest": 7102, "meta": 7103, "ssh": 7104, "maint": 7105}
DEFAULT_BACKENDS = 20
# The ciphers ssh.ciphers may name: the modern ones asyncssh has (services/ssh/ciphers.py chooses the default).
SSH_CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
# Old top-level names read for one more release: old name -> (section, key).
RENAMED = {
    "ssh_port": ("ssh", "port"),
    "ssh_listen_host": ("ssh", "listen_host"),
    "homes_dir": ("ssh", "homes_dir"),
    "ssh_default_max_size": ("ssh", "default_max_size"),
    "rrsync": ("ssh", "rrsync"),
}


@dataclass(frozen=True)
class BackendSpec:
    name: str
    uri: str


def default_backends(data_dir: Path, n: int = DEFAULT_BACKENDS) -> tuple[BackendSpec, ...]:
    return tuple(BackendSpec(f"b{i:02d}", f"dir://{data_dir}/backends/b{i:02d}") for i in range(n))


class Backends(Check):
    """The shard backends: a list of URIs or {name, uri} mappings (a URI alone is named bNN)."""

    kind = "list of backend URI or {name, uri}"

    def read(self, value: object, where: str, ctx: Context) -> tuple[BackendSpec, ...]:
        items = expect(value, list, where, "a list of URIs or {name, uri} mappings")
        out: list[BackendSpec] = []
        for i, item in enumerate(items):
            at = f"{where}[{i}]"
            if isinstance(item, str):
                name, uri = f"b{i:02d}", item
            else:
                item = expect(item, dict, at, "a URI or a {name, uri} mapping")
                name = expect(item.get("name", f"b{i:02d}"), str, f"{at}.name", "a string")
                uri = expect(item.get("uri"), str, f"{at}.uri", "a backend URI")
            if not NAME_RE.match(name):
                fail(f"{at}.name", f"{name!r} must be 1-64 of letters, digits, '_', '.', '-'")
            out.append(BackendSpec(name, BackendUri().read(uri, at, ctx)))
        names = [b.name for b in out]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            fail(where, f"duplicate name(s) {', '.join(dupes)}")
        uris = [b.uri for b in out]
        if len(set(uris)) != len(uris):
            fail(where, "the same URI is listed twice (each shard copy must be independent)")
        return tuple(out)

    def dump(self, value: Any) -> Any:
        return [{"name": b.name, "uri": b.uri} for b in value]


@dataclass(frozen=True)
class MetadataConfig:
    """File metadata: the records, the dedup index, and replicas on other machines."""

    uri: str = setting(
        "",
        "records: a sequential namespace that allocates the file ids (a role: replica gateway: its replica)",
        BackendUri(),
        derive=lambda dd: f"dir://{dd}/meta/records",
    )
    index_uri: str = setting(
        "",
        "content hash -> id index (a user-key namespace), for dedup; a replica gateway does not use it",
        BackendUri(),
        derive=lambda dd: f"dir://{dd}/meta/index",
    )
    replicas: tuple[str, ...] = setting(
        (),
        "replica namespaces on other machines, written through by meta in order",
        ListOf(BackendUri(), "a list of URIs"),
    )
    mode: str = setting(
        "seq",
        "how uri is keyed: seq (a master's namespace: it allocates the ids) or user (role: replica, keyed by the"
        " master's ids)",
        Choice("seq", "user"),
    )
    master: str = setting(
        "",
        "replica gateways: the master's records namespace, read by maint's ReplicaStatus (\"\" = unknown)",
        BackendUri(empty_ok=True),
    )
    sync_interval: float = setting(
        10.0,
        "seconds between meta's replica catch-up rounds (a replica that was away is caught up)",
        Number(positive=True),
    )
    verify_interval: float = setting(
        86400.0, "seconds between full compares of every replica record with the master; 0 = off", Number()
    )

    def validate(self) -> None:
        if self.uri in self.replicas:
            fail("metadata.replicas", "a replica cannot be the master namespace (metadata.uri) itself")


@dataclass(frozen=True)
class MaintConfig:
    """Maintenance: scrub and repair, the repair queue, orphan collection, home cleanup, backups, dir compaction."""

    scrub_interval: float = setting(
        86400.0, "seconds between scrub pass starts; 0 = only when asked (Scrub RPC)", Number()
    )
    scrub_files_per_second: float = setting(
        20.0, "files a scrub checks per second at most", Number("a number", kind="files per second", positive=True)
    )
    scrub_bytes_per_second: int = setting(
        32 * 10**6, "shard bytes a scrub or repair reads per second at most (sizes like 32MB work too)", Size(1)
    )
    hard_every: int = setting(
        7, "every Nth scheduled pass is a hard pass (fetch, verify and decrypt every file)", Int(1)
    )
    cleanup_interval: float = setting(300.0, "seconds between SSH home quota sweeps; 0 = off", Number())
    backup_interval: float = setting(
        86400.0, "seconds between metadata backups into the pool; 0 = only when asked (Backup RPC)", Number()
    )
    compact_interval: float = setting(
        3600.0, "seconds between compactions of the dir:// backends; 0 = only when asked (Compact RPC)", Number()
    )
    compact_min_dead: float = setting(
        0.25, "a scheduled compaction rewrites a segment once this share of it is dead (0..1; asked: any dead byte)",
        Number("a fraction", kind="fraction", zero="any dead byte"),
    )  # fmt: skip
    orphan_interval: float = setting(
        86400.0,
        "seconds between orphan collections (shards no record references and no running job owns are deleted);"
        " 0 = only when asked (CollectOrphans RPC)",
        Number(),
    )
    orphan_grace: float = setting(
        3600.0,
        "seconds a shard must have existed before it can be collected as an orphan, on top of the running"
        " jobs' leases (by the high water marks maint notes)",
        Number(),
    )
    rebuild_unreachable_after: float = setting(
        86400.0,
        "seconds a backend may stay unreachable before repairs rebuild its shards on other backends (0 = at"
        " once); until then they wait for it to come back",
        Number(),
    )

    def validate(self) -> None:
        if self.compact_min_dead > 1:
            fail("maint.compact_min_dead", f"must be a fraction between 0 and 1, got {self.compact_min_dead}")


@dataclass(frozen=True)
class SshConfig:
    """The ssh service's SSH server (SFTP, SCP, rsync) and its users' homes."""

    port: int = setting(
        2222, "port of the SSH server; 0 = a free port chosen at each start", Int(0, 65535), env="GRIDSTOR_SSH_PORT"
    )
    listen_host: str = setting(
        "", 'address the SSH server listens on; "" = listen_host', Text("a host"), env="GRIDSTOR_SSH_HOST"
    )
    homes_dir: Path = setting(
        Path("homes"), "folder of the users' homes; a relative path is inside data_dir", Folder(),
        env="GRIDSTOR_HOMES_DIR",
    )  # fmt: skip
    default_max_size: int = setting(
        1024**3,
        "a home's size limit when EnableAccount gives none (sizes like 500MB work too)",
        Size(1),
        env="GRIDSTOR_SSH_DEFAULT_MAX",
    )
    rrsync: str = setting(
        "",
        'rsync\'s restricted wrapper for rsync over SSH; "" = found (/usr/bin/rrsync on Debian 12)',
        Text("a path to rrsync"),
        env="GRIDSTOR_RRSYNC",
    )
    max_entries: int = setting(
        1_000_000, "files, folders and links a home may hold (every account; docs/ssh.md)", Int(1)
    )
    login_timeout: float = setting(
        30.0, "seconds a connection has to log in before it is closed", Number(positive=True)
    )
    max_unauthenticated: int = setting(100, "connections not yet logged in, in all; more are closed at once", Int(1))
    max_unauthenticated_per_address: int = setting(
        10, "connections not yet logged in from one client address; more are closed at once", Int(1)
    )
    ciphers: tuple[str, ...] = setting(
        (),
        "SSH ciphers offered, in order; [] = AES only if the CPU has AES instructions, else chacha20 first",
        ListOf(Choice(*SSH_CIPHERS), "a list of cipher names"),
    )


@dataclass(frozen=True)
class TlsConfig:
    """TLS of the edge (Envoy) and of the services' own ports (docs/tls.md).

    Relative paths are relative to the data dir (the defaults: ``DATA/tls/...``,
    where ``make up`` creates a local CA and a server certificate on first start).
    """

    edge: bool = setting(
        True, "Envoy serves HTTPS and gRPC over TLS; false = plain HTTP (local development only)", Flag()
    )
    internal: bool | None = setting(
        None, "the services' own ports and metrics: true, false, or auto (TLS unless listen_host is loopback)",
        AutoFlag(),
    )  # fmt: skip
    ca: Path = setting(
        Path("tls/ca.pem"), "the CA clients and services verify the gateway's certificate against (in data_dir)",
        FilePath(),
    )  # fmt: skip
    cert: Path = setting(
        Path("tls/server.pem"), "the gateway's certificate chain (services; Envoy too unless edge_cert)", FilePath()
    )
    key: Path = setting(Path("tls/server.key"), "the private key of cert (0600)", FilePath())
    edge_cert: Path | None = setting(
        None, "Envoy's own certificate chain, e.g. from a public CA like Let's Encrypt; null = cert",
        FilePath(optional=True),
    )  # fmt: skip
    edge_key: Path | None = setting(None, "the private key of edge_cert; null = key", FilePath(optional=True))
    names: tuple[str, ...] = setting(
        (), "more DNS names / IP addresses for the generated certificate (how clients reach the gateway)",
        ListOf(CertName(), "a list of DNS names or IP addresses"),
    )  # fmt: skip

    def validate(self) -> None:
        if (self.edge_cert is None) != (self.edge_key is None):
            fail("tls", "edge_cert and edge_key go together (Envoy's own certificate and its key)")


_ADDRESSES = "a list of IP addresses, networks (10.0.0.0/8) or host names"
# Room for the headers Envoy adds (x-forwarded-for, x-request-id, x-envoy-*) and gRPC's 32 bytes per entry.
METADATA_MARGIN = 16 * 1024


@dataclass(frozen=True)
class LimitsConfig:
    """Per-client limits, shared through Redis by every process, per-process caps, and Envoy's edge limits.

    Over a limit a client gets RESOURCE_EXHAUSTED (HTTP 429) with a retry-after (docs/limits.md).
    """

    uploads_per_identity: int = setting(4, "concurrent uploads of one identity (token subject); 0 = no limit", Int(0))
    uploads_per_address: int = setting(8, "concurrent uploads from one client address; 0 = no limit", Int(0))
    rate_per_identity: float = setting(
        20.0, "requests per second of one identity, sustained; 0 = no limit", Number("requests per second",
        kind="requests per second", zero="no limit"),
    )  # fmt: skip
    burst_per_identity: int = setting(100, "requests one identity may send at once above that rate", Int(1))
    rate_per_address: float = setting(
        50.0, "requests per second from one client address (IPv6: per /64); 0 = no limit",
        Number("requests per second", kind="requests per second", zero="no limit"),
    )  # fmt: skip
    burst_per_address: int = setting(200, "requests one client address may send at once above that rate", Int(1))
    upload_idle_timeout: float = setting(
        60.0, "seconds an upload may send nothing before ingest drops it", Number(positive=True)
    )
    downloads_per_process: int = setting(
        8, "downloads one meta process streams at once (its memory bound); more wait for a slot; 0 = no cap", Int(0)
    )
    uploads_per_process: int = setting(
        32, "uploads one ingest process receives at once; more wait, unread, for a slot; 0 = no cap", Int(0)
    )
    upload_window: int = setting(
        1024**2, "bytes of each upload stream ingest's gRPC core takes ahead of the handler (its HTTP/2 receive"
        " window; memory: up to this per upload, read or waiting)", Size(64 * 1024),
    )  # fmt: skip
    busy_wait: float = setting(
        30.0, "seconds a download or upload waits for a slot of its process before RESOURCE_EXHAUSTED (busy)",
        Number(positive=True),
    )  # fmt: skip
    download_read_ahead: int = setting(
        32 * 1024**2, "plaintext a meta process fetches ahead for all its downloads together (sizes like 32MiB)",
        Size(1),
    )  # fmt: skip
    exempt: tuple[str, ...] = setting(
        ("127.0.0.0/8", "::1"), "client addresses, networks or host names never limited (e.g. this machine)",
        ListOf(Address(), _ADDRESSES),
    )  # fmt: skip
    trusted_proxies: tuple[str, ...] = setting(
        ("127.0.0.0/8", "::1"), "peers whose x-forwarded-for (the client address Envoy appends) is believed",
        ListOf(Address(), _ADDRESSES),
    )  # fmt: skip
    edge_max_connections: int = setting(10000, "client connections Envoy holds open in total", Int(1))
    edge_streams_per_connection: int = setting(
        100, "concurrent HTTP/2 streams (requests) on one client connection", Int(1, 2**31 - 1)
    )
    edge_max_request_headers_kb: int = setting(32, "largest request header block Envoy accepts, in KiB", Int(1, 8192))
    edge_request_headers_timeout: float = setting(
        10.0, "seconds a client has to send its request headers", Number(positive=True)
    )
    edge_idle_timeout: float = setting(
        300.0, "seconds a request or connection may pass with no bytes either way before Envoy ends it",
        Number(positive=True),
    )  # fmt: skip

    # One header limit end to end (docs/limits.md): clients see edge_max_request_headers_kb, checked by
    # the edge with a clear answer (431 over REST); Envoy's codec stops at twice that (it can only reset an
    # HTTP/2 stream), and the services accept all Envoy may forward, so they never refuse headers themselves.

    @property
    def edge_header_bytes(self) -> int:
        """The request header block clients may send, in bytes (names and values, pseudo-headers included)."""
        return self.edge_max_request_headers_kb * 1024

    @property
    def edge_codec_headers_kb(self) -> int:
        """Envoy's codec limit, above the checked one so the edge's own check answers first."""
        return min(8192, 2 * self.edge_max_request_headers_kb)

    @property
    def service_metadata_bytes(self) -> int:
        """gRPC metadata the services accept: all Envoy may forward (its codec limit), plus what it adds."""
        return self.edge_codec_headers_kb * 1024 + METADATA_MARGIN


@dataclass(frozen=True)
class Config:
    """The whole gateway configuration (the top level of the YAML)."""

    data_dir: Path = setting(
        Path("data"),
        "folder of the gateway keys, the upload spool, logs and (by default) metadata and shards; --data wins",
        Folder(base="cwd"),
        env="GRIDSTOR_DATA_DIR",
    )
    mode: str = setting(
        "public",
        "who may log in: public (anyone), secret (one shared secret) or allowlist (identities with ed25519 keys)",
        Choice(*MODES),
        env="GRIDSTOR_MODE",
    )
    secret: str = setting(
        "", "secret mode: the shared secret, at least 16 characters (keep this file 0600)", Text(), repr=False
    )
    allowlist: Mapping[str, str] = setting(
        {}, "allowlist mode: identity -> ed25519 public key as 64 hex characters (a key pair: `gridstor keygen`)",
        MapOf(Name(), HexKey(), "a mapping of identity: public key hex"),
    )  # fmt: skip
    token_ttl: int = setting(86400, "seconds a login token stays valid", Int(60))
    auth_skew: int = setting(
        60, "allowlist mode: seconds a login's signed time may differ from the gateway's clock", Int(1, 3600)
    )
    listen_host: str = setting(
        "127.0.0.1", "address every service listens on; 0.0.0.0 serves other machines too", Text("a host"),
        env="GRIDSTOR_LISTEN_HOST",
    )  # fmt: skip
    ports: Mapping[str, int] = setting(
        dict(DEFAULT_PORTS), "gRPC port of each service; a service left out keeps its default",
        MapOf(Service(SERVICES), Int(1, 65535), "a mapping of service: port", base=DEFAULT_PORTS),
    )  # fmt: skip
    metrics_port_offset: int = setting(
        100, "the Prometheus metrics of a service listen on its port + this (http://HOST:PORT/metrics)", Int(0, 1000)
    )
    redis_url: str = setting(
        "",
        "the job queue: unix:///path (make up starts redis-server on that socket), redis://127.0.0.1:PORT/0"
        " (it starts one on that port) or an external redis://host:port/db",
        RedisUrl(),
        env="GRIDSTOR_REDIS_URL",
        key="redis",
        derive=lambda dd: f"unix://{dd}/redis.sock",
    )
    engine: EngineConfig = section(EngineConfig)
    backends: tuple[BackendSpec, ...] = setting(
        (),
        "shard backends, at least k+m: dir:///path (a folder; one per disk) or zdb://[:password@]host:port/namespace"
        " (0-db, sequential mode); a URI or {name, uri}",
        Backends(),
        derive=default_backends,
    )
    metadata: MetadataConfig = section(MetadataConfig)
    max_upload: int = setting(100 * 10**6, "largest upload in bytes (sizes like 100MB or 1GiB work too)", Size())
    workers: int = setting(0, "ingest's store worker processes; 0 = one per CPU core", Int(0, 64))
    status_max_wait: int = setting(300, "longest wait of Status(wait=true), in seconds", Int(1, 3600))
    outage_wait: float = setting(
        600.0,
        "seconds a store job waits out an unreachable meta service, metadata store or job queue (redis), ACTIVE"
        " with the reason in Status, before it fails",
        Number(positive=True),
    )
    role: str = setting(
        "master", "master, or replica: serve reads from the metadata replica alone", Choice("master", "replica")
    )
    maint: MaintConfig = section(MaintConfig)
    admins: tuple[str, ...] = setting(
        (), "allowlist mode: identities that may call the admin methods besides admin tokens (refused in other modes)",
        ListOf(Name(), "a list of identities"),
    )  # fmt: skip
    envoy_port: int = setting(
        8080, "port of the edge (Envoy): REST and gRPC, over TLS unless tls.edge is false", Int(1, 65535)
    )
    ssh: SshConfig = section(SshConfig)
    hosts: Mapping[str, str] = setting(
        {}, "where the services dial each service (compose: its container name); a service left out: listen_host",
        MapOf(Service(SERVICES), Host(), "a mapping of service: host"),
    )  # fmt: skip
    tls: TlsConfig = section(TlsConfig)
    limits: LimitsConfig = section(LimitsConfig)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def ssh_state_dir(self) -> Path:
        """The ssh service's own state: accounts, host key, pending removals."""
        return self.data_dir / "ssh"

    @property
    def internal_tls(self) -> bool:
        """Whether the services' own ports use TLS (``tls.internal``; auto: unless they listen on loopback only)."""
        if self.tls.internal is not None:
            return self.tls.internal
        return not is_loopback(self.listen_host)

    def tls_path(self, path: Path) -> Path:
        """A ``tls:`` path made absolute (relative ones are in the data dir)."""
        return self.data_dir / path

    def address(self, service: str) -> str:
        host = self.hosts.get(service, self.listen_host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.ports[service]}"

    def validate(self) -> None:
        """The checks between settings (each setting alone is checked as it is read)."""
        if self.mode == "secret" and len(self.secret) < 16:
            fail("secret", "mode 'secret' needs a shared secret of at least 16 characters")
        if self.mode == "allowlist" and not self.allowlist:
            fail("allowlist", "mode 'allowlist' needs at least one identity")
        if self.admins and self.mode != "allowlist":
            fail(
                "admins",
                f"mode {self.mode!r} does not prove identities (anyone may log in under any name), so listing"
                " admins would make anyone an admin: remove admins and use `gridstor admin token` on the gateway"
                " machine, or use mode 'allowlist', where identities are proven by their keys",
            )
        if len(set(self.ports.values())) != len(self.ports):
            fail("ports", f"two services share a port: {dict(self.ports)}")
        k, m = self.engine.k, self.engine.m
        if len(self.backends) < k + m:
            fail("backends", f"{len(self.backends)} configured, {k}+{m} coding needs at least {k + m}")
        if self.role == "master" and self.metadata.mode != "seq":
            fail(
                "metadata.mode",
                "a master gateway allocates metadata ids, so its namespace must be seq"
                " (user is for a role: replica gateway reading a replica namespace)",
            )
        if self.envoy_port in self.ports.values():
            fail("envoy_port", f"{self.envoy_port} is also the port of a service")
        if self.ssh.port and self.ssh.port in (*self.ports.values(), self.envoy_port):
            fail("ssh.port", f"{self.ssh.port} is also the port of another service")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) is reachable from this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str | Path | None = None, *, data_dir: str | Path | None = None) -> Config:
    """Read and validate a config file (or the defaults when ``path`` is None)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"config: cannot read {p}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: {p} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config: {p} must hold a mapping of settings, got {type(loaded).__name__}")
        raw = dict(loaded or {})
    return build_config(raw, data_dir=data_dir)


def build_config(
    raw: Mapping[str, Any], *, data_dir: str | Path | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Validate a mapping of settings (as loaded from YAML) into a Config.

    ``data_dir`` (the --data option) wins over the mapping's; ``env`` (default: the process
    environment) wins over both, for the settings that name a variable.
    """
    env = os.environ if env is None else env
    raw = _renamed(dict(raw))
    if data_dir is not None:
        raw["data_dir"] = str(data_dir)
    dd = read_setting(Config, "data_dir", raw, "", Context(Path(), env))
    return read_section(Config, raw, "", Context(dd, env))


def dump_config(cfg: Config) -> dict[str, Any]:
    """``cfg`` as a mapping of plain YAML values; ``build_config`` of it (same environment) equals ``cfg``."""
    return dump_section(cfg)


def _renamed(raw: dict[str, Any]) -> dict[str, Any]:
    """Move the old top-level names (``RENAMED``) into their section, with a warning; refuse both at once."""
    for old, (part, key) in RENAMED.items():
        if old not in raw:
            continue
        sub = raw.get(part)
        sub = {} if sub is None else sub
        if not isinstance(sub, dict):
            continue  # reading the section names what is wrong with it
        if key in sub:
            fail(old, f"the config sets both {old} (the old name) and {part}.{key}; keep {part}.{key} only")
        value = raw.pop(old)
        if old == "homes_dir" and isinstance(value, str) and value.strip():
            value = str(Path(value).expanduser().absolute())  # the old name was relative to the working dir
        log.warning(
            "config: %s is deprecated; write it as %s.%s (the old name goes in the next release)", old, part, key
        )
        raw[part] = {**sub, key: value}
    return raw
