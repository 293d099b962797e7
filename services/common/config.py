"""The gateway configuration: one YAML file, validated at start.

Every field has a default that works on one machine (``make up``): 20 dir
backends under the data dir, metadata in a dir store, public mode on
127.0.0.1. A wrong or unknown field stops the start with a message naming the
field and what is wrong, e.g. ``config: engine.k: must be an integer >= 1``.

Maintenance (``maint:``): scrub_interval, scrub_files_per_second,
scrub_bytes_per_second, hard_every, cleanup_interval, backup_interval (see
MaintConfig). Metadata replicas (``metadata:``): replicas (one or two user-key
namespaces on other machines, written through by meta), sync_interval, verify_interval; a
``role: replica`` gateway points ``metadata.uri`` at its replica with
``metadata.mode: user`` and may name the master in ``metadata.master``.

TLS (``tls:``, see TlsConfig and docs/tls.md): edge, internal, ca, cert, key,
edge_cert, edge_key, names. Limits (``limits:``, see LimitsConfig and
docs/limits.md): concurrent uploads and requests per second per identity and
per client address, upload_idle_timeout, exempt, trusted_proxies, and Envoy's
connection, stream, header and timeout limits (edge_*).

Environment overrides: ``GRIDSTOR_DATA_DIR``, ``GRIDSTOR_REDIS_URL``,
``GRIDSTOR_MODE``, ``GRIDSTOR_LISTEN_HOST``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from services.common.backends.uri import parse_uri
from services.common.engine import DEFAULT_CHUNK_SIZE, EngineConfig
from services.common.errors import InvalidInput

MODES = ("public", "secret", "allowlist")
SERVICES = ("auth", "ingest", "meta", "ssh", "maint")
DEFAULT_PORTS = {"auth": 7101, "ingest": 7102, "meta": 7103, "ssh": 7104, "maint": 7105}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class ConfigError(InvalidInput):
    """The configuration is wrong; the message names the field."""


def parse_size(value: object, where: str) -> int:
    """Bytes from an int or a string like ``100MB``, ``4MiB``, ``1.5G``."""
    if isinstance(value, bool):
        raise ConfigError(f"config: {where}: expected a size like 100MB, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "").lower()
        base = 1024 if "i" in unit else 1000
        mult = _UNITS[unit[:1]] if base == 1000 else base ** ("bkmgt".index(unit[0]))
        n = int(float(m.group(1)) * mult)
    else:
        raise ConfigError(f"config: {where}: expected a size like 100MB or 4MiB, got {value!r}")
    if n < 0:
        raise ConfigError(f"config: {where}: must not be negative")
    return n


@dataclass(frozen=True)
class BackendSpec:
    name: str
    uri: str


@dataclass(frozen=True)
class MetadataConfig:
    uri: str
    index_uri: str
    replicas: tuple[str, ...] = ()
    # How ``uri`` is keyed: "seq" (a master namespace: it allocates the ids) or "user" (a replica
    # namespace keyed by the master's 8-byte ids; only a ``role: replica`` gateway reads one).
    mode: str = "seq"
    # A replica gateway: the master's records namespace, read only by maint's ReplicaStatus ("" = unknown).
    master: str = ""
    # Seconds between meta's replica catch-up rounds (a replica that was away is caught up within this).
    sync_interval: float = 10.0
    # Seconds between full compares of every replica record with the master (catches missed updates).
    verify_interval: float = 86400.0


@dataclass(frozen=True)
class MaintConfig:
    """The maint service's schedules and budgets (``maint:`` in the YAML)."""

    scrub_interval: float = 86400.0  # seconds between scrub pass starts; 0 = only when asked (Scrub RPC)
    scrub_files_per_second: float = 20.0  # files checked per second at most
    scrub_bytes_per_second: int = 32 * 10**6  # shard bytes read per second at most (hard checks, repairs)
    hard_every: int = 7  # every Nth scheduled pass is a hard pass (fetch, verify, decrypt every file)
    cleanup_interval: float = 300.0  # seconds between home quota sweeps; 0 = off
    backup_interval: float = 86400.0  # seconds between metadata backups; 0 = only when asked (Backup RPC)


@dataclass(frozen=True)
class TlsConfig:
    """TLS of the edge (Envoy) and of the services' own gRPC ports (``tls:`` in the YAML).

    Relative paths are relative to the data dir (the defaults: ``DATA/tls/...``,
    where ``make up`` creates a local CA and a server certificate on first start).
    """

    edge: bool = True  # Envoy serves HTTPS and gRPC over TLS; false = plain HTTP (local development only)
    # The services' own ports (and their metrics): True, False, or None = auto: TLS unless listen_host is loopback.
    internal: bool | None = None
    ca: Path = Path("tls/ca.pem")  # the CA clients and services verify the gateway's certificate against
    cert: Path = Path("tls/server.pem")  # the gateway's certificate chain (services; Envoy unless edge_cert)
    key: Path = Path("tls/server.key")  # its private key (0600)
    edge_cert: Path | None = None  # Envoy's own chain, e.g. from a public CA; None = cert
    edge_key: Path | None = None  # its key; None = key
    names: tuple[str, ...] = ()  # extra DNS names / IP addresses for the generated certificate


@dataclass(frozen=True)
class LimitsConfig:
    """Per-client limits (shared through Redis by every process) and Envoy's edge limits (``limits:``)."""

    uploads_per_identity: int = 4  # concurrent uploads of one identity (token subject); 0 = no limit
    uploads_per_address: int = 8  # concurrent uploads from one client address; 0 = no limit
    rate_per_identity: float = 20.0  # requests per second of one identity, sustained; 0 = no limit
    burst_per_identity: int = 100  # requests one identity may send at once above that rate
    rate_per_address: float = 50.0  # requests per second from one client address; 0 = no limit
    burst_per_address: int = 200
    upload_idle_timeout: float = 60.0  # seconds an upload may send nothing before ingest drops it
    # Client addresses never limited (IPs, networks, host names): local clients of a one-machine gateway.
    exempt: tuple[str, ...] = ("127.0.0.0/8", "::1")
    # Peers whose x-forwarded-for (the client address Envoy appends) is believed: Envoy's address.
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1")
    edge_max_connections: int = 10000  # open client connections Envoy accepts in total
    edge_streams_per_connection: int = 100  # concurrent HTTP/2 streams (requests) on one connection
    edge_max_request_headers_kb: int = 32  # largest request header block
    edge_request_headers_timeout: float = 10.0  # seconds a client has to send its request headers
    edge_idle_timeout: float = 300.0  # seconds a request or connection may pass with no bytes either way


@dataclass(frozen=True)
class Config:
    data_dir: Path
    mode: str = "public"
    secret: str = field(default="", repr=False)
    allowlist: Mapping[str, str] = field(default_factory=dict)  # identity -> ed25519 public key (hex)
    token_ttl: int = 86400
    auth_skew: int = 60
    listen_host: str = "127.0.0.1"
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    metrics_port_offset: int = 100  # metrics of service S listen on ports[S] + offset
    redis_url: str = ""
    engine: EngineConfig = field(default_factory=EngineConfig)
    backends: tuple[BackendSpec, ...] = ()
    metadata: MetadataConfig | None = None
    max_upload: int = 100 * 10**6
    workers: int = 0  # 0 = one per core
    status_max_wait: int = 300
    role: str = "master"
    maint: MaintConfig = field(default_factory=MaintConfig)
    admins: tuple[str, ...] = ()  # identities (allowlist/secret logins) that may call admin methods
    envoy_port: int = 8080  # REST + gRPC edge (Envoy)
    ssh_port: int = 2222  # the SSH server of the ssh service (SFTP/SCP/rsync homes)
    ssh_listen_host: str = ""  # "" = listen_host
    homes_dir: Path | None = None  # None = data_dir/homes
    ssh_default_max_size: int = 1024**3  # a home's size when EnableAccount says 0
    rrsync: str = ""  # rsync's restricted wrapper; "" = found (/usr/bin/rrsync on Debian 12)
    # Where each service is dialled by the others (compose: its container name); default listen_host.
    hosts: Mapping[str, str] = field(default_factory=dict)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

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


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) is reachable from this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_backends(data_dir: Path, n: int = 20) -> tuple[BackendSpec, ...]:
    return tuple(BackendSpec(f"b{i:02d}", f"dir://{data_dir}/backends/b{i:02d}") for i in range(n))


def _expect(value: object, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"config: {where}: expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"config: {where}: expected {what}, got {type(value).__name__} {value!r}")
    return value


def _section(value: object, name: str, known: Iterable[str], what: str = "a mapping") -> dict[str, Any]:
    """A config section as a mapping; ConfigError naming any setting not in ``known``."""
    raw: dict[str, Any] = _expect(value, dict, name, what)
    allowed = set(known)
    bad = sorted(set(raw) - allowed)
    if bad:
        raise ConfigError(f"config: {name}: unknown setting(s) {', '.join(bad)}; known: {', '.join(sorted(allowed))}")
    return raw


def _int(value: object, where: str, lo: int, hi: int | None = None) -> int:
    n = _expect(value, int, where, "an integer")
    if n < lo or (hi is not None and n > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"config: {where}: must be an integer {rng}, got {n}")
    return int(n)


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


def build_config(raw: Mapping[str, Any], *, data_dir: str | Path | None = None) -> Config:
    """Validate a mapping of settings (as loaded from YAML) into a Config."""
    raw = dict(raw)
    known = {f.name for f in fields(Config)} | {"max_upload", "redis", "ports"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"config: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    env = os.environ
    dd = Path(env.get("GRIDSTOR_DATA_DIR") or data_dir or raw.get("data_dir") or "data").expanduser().absolute()
    mode = env.get("GRIDSTOR_MODE") or raw.get("mode", "public")
    if mode not in MODES:
        raise ConfigError(f"config: mode: must be one of {', '.join(MODES)}, got {mode!r}")
    secret = _expect(raw.get("secret", ""), str, "secret", "a string")
    if mode == "secret" and len(secret) < 16:
        raise ConfigError("config: secret: mode 'secret' needs a shared secret of at least 16 characters")
    allow_raw = _expect(raw.get("allowlist") or {}, dict, "allowlist", "a mapping of identity: public key hex")
    allowlist: dict[str, str] = {}
    for ident, key in allow_raw.items():
        where = f"allowlist.{ident}"
        if not isinstance(ident, str) or not _NAME.match(ident):
            raise ConfigError(f"config: {where}: identity must be 1-64 of letters, digits, '_', '.', '-'")
        key = _expect(key, str, where, "an ed25519 public key as 64 hex characters")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", key):
            raise ConfigError(f"config: {where}: expected an ed25519 public key as 64 hex characters")
        allowlist[ident] = key.lower()
    if mode == "allowlist" and not allowlist:
        raise ConfigError("config: allowlist: mode 'allowlist' needs at least one identity")

    ports = dict(DEFAULT_PORTS)
    for svc, port in _expect(raw.get("ports") or {}, dict, "ports", "a mapping of service: port").items():
        if svc not in DEFAULT_PORTS:
            raise ConfigError(f"config: ports.{svc}: unknown service; known: {', '.join(SERVICES)}")
        ports[svc] = _int(port, f"ports.{svc}", 1, 65535)
    if len(set(ports.values())) != len(ports):
        raise ConfigError(f"config: ports: two services share a port: {ports}")

    eng_raw = _section(raw.get("engine") or {}, "engine", (f.name for f in fields(EngineConfig)))
    eng_kwargs: dict[str, Any] = {}
    for key, value in eng_raw.items():
        if key == "chunk_size":
            eng_kwargs[key] = parse_size(value, "engine.chunk_size")
        elif key == "ec_type":
            eng_kwargs[key] = _expect(value, str, "engine.ec_type", "a string")
        elif key in ("hedge_after", "shard_timeout", "backend_cooldown"):
            v = _expect(value, (int, float), f"engine.{key}", "a number of seconds")
            if v <= 0:
                raise ConfigError(f"config: engine.{key}: must be positive")
            eng_kwargs[key] = float(v)
        else:
            eng_kwargs[key] = _int(value, f"engine.{key}", 1)
    eng_kwargs.setdefault("chunk_size", DEFAULT_CHUNK_SIZE)
    try:
        engine = EngineConfig(**eng_kwargs)
    except InvalidInput as exc:
        raise ConfigError(f"config: engine: {exc}") from None

    backends = _backends(raw.get("backends"), dd)
    if len(backends) < engine.k + engine.m:
        raise ConfigError(
            f"config: backends: {len(backends)} configured, {engine.k}+{engine.m} coding needs at least"
            f" {engine.k + engine.m}"
        )
    metadata = _metadata(raw.get("metadata"), dd)
    redis_url = env.get("GRIDSTOR_REDIS_URL") or _expect(raw.get("redis", ""), str, "redis", "a redis:// URL")
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"config: redis: expected redis://host:port/db or unix:///path, got {redis_url!r}")
    role = _expect(raw.get("role", "master"), str, "role", "master or replica")
    if role not in ("master", "replica"):
        raise ConfigError(f"config: role: must be master or replica, got {role!r}")
    if role == "master" and metadata.mode != "seq":
        raise ConfigError(
            "config: metadata.mode: a master gateway allocates metadata ids, so its namespace must be seq"
            " (user is for a role: replica gateway reading a replica namespace)"
        )
    envoy_port = _int(raw.get("envoy_port", 8080), "envoy_port", 1, 65535)
    if envoy_port in ports.values():
        raise ConfigError(f"config: envoy_port: {envoy_port} is also the port of a service")
    admins_raw = _expect(raw.get("admins") or [], list, "admins", "a list of identities")
    for i, ident in enumerate(admins_raw):
        if not isinstance(ident, str) or not _NAME.match(ident):
            raise ConfigError(f"config: admins[{i}]: identity must be 1-64 of letters, digits, '_', '.', '-'")
    admins = tuple(admins_raw)
    ssh_port = _int(raw.get("ssh_port", 2222), "ssh_port", 0, 65535)
    if ssh_port and ssh_port in (*ports.values(), envoy_port):
        raise ConfigError(f"config: ssh_port: {ssh_port} is also the port of another service")
    homes_raw = raw.get("homes_dir")
    if homes_raw is not None:
        _expect(homes_raw, str, "homes_dir", "a folder path")
    ssh_max = parse_size(raw.get("ssh_default_max_size", 1024**3), "ssh_default_max_size")
    if ssh_max <= 0:
        raise ConfigError("config: ssh_default_max_size: must be more than 0 bytes")
    hosts: dict[str, str] = {}
    for svc, host in _expect(raw.get("hosts") or {}, dict, "hosts", "a mapping of service: host").items():
        if svc not in DEFAULT_PORTS:
            raise ConfigError(f"config: hosts.{svc}: unknown service; known: {', '.join(SERVICES)}")
        host = _expect(host, str, f"hosts.{svc}", "a host name or address")
        if not host or any(c in host for c in "/ @?#"):
            raise ConfigError(f"config: hosts.{svc}: {host!r} is not a host name or address")
        hosts[svc] = host
    return Config(
        data_dir=dd,
        mode=mode,
        secret=secret,
        allowlist=allowlist,
        token_ttl=_int(raw.get("token_ttl", 86400), "token_ttl", 60),
        auth_skew=_int(raw.get("auth_skew", 60), "auth_skew", 1, 3600),
        listen_host=env.get("GRIDSTOR_LISTEN_HOST")
        or _expect(raw.get("listen_host", "127.0.0.1"), str, "listen_host", "a host"),
        ports=ports,
        metrics_port_offset=_int(raw.get("metrics_port_offset", 100), "metrics_port_offset", 0, 1000),
        redis_url=redis_url or f"unix://{dd}/redis.sock",
        engine=engine,
        backends=backends,
        metadata=metadata,
        max_upload=parse_size(raw.get("max_upload", 100 * 10**6), "max_upload"),
        workers=_int(raw.get("workers", 0), "workers", 0, 64),
        status_max_wait=_int(raw.get("status_max_wait", 300), "status_max_wait", 1, 3600),
        role=role,
        maint=_maint(raw.get("maint")),
        envoy_port=envoy_port,
        hosts=hosts,
        admins=admins,
        ssh_port=ssh_port,
        ssh_listen_host=_expect(raw.get("ssh_listen_host", ""), str, "ssh_listen_host", "a host"),
        homes_dir=None if homes_raw is None else Path(homes_raw).expanduser().absolute(),
        ssh_default_max_size=ssh_max,
        rrsync=_expect(raw.get("rrsync", ""), str, "rrsync", "a path to rrsync"),
        tls=_tls(raw.get("tls")),
        limits=_limits(raw.get("limits")),
    )


def _backends(value: object, data_dir: Path) -> tuple[BackendSpec, ...]:
    if value is None:
        return default_backends(data_dir)
    items = _expect(value, list, "backends", "a list of URIs or {name, uri} mappings")
    out: list[BackendSpec] = []
    for i, item in enumerate(items):
        where = f"backends[{i}]"
        if isinstance(item, str):
            name, uri = f"b{i:02d}", item
        else:
            item = _expect(item, dict, where, "a URI or a {name, uri} mapping")
            name = _expect(item.get("name", f"b{i:02d}"), str, f"{where}.name", "a string")
            uri = _expect(item.get("uri"), str, f"{where}.uri", "a backend URI")
        if not _NAME.match(name):
            raise ConfigError(f"config: {where}.name: {name!r} must be 1-64 of letters, digits, '_', '.', '-'")
        try:
            parse_uri(uri)
        except InvalidInput as exc:
            raise ConfigError(f"config: {where}: {exc}") from None
        out.append(BackendSpec(name, uri))
    names = [b.name for b in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"config: backends: duplicate name(s) {', '.join(dupes)}")
    uris = [b.uri for b in out]
    if len(set(uris)) != len(uris):
        raise ConfigError("config: backends: the same URI is listed twice (each shard copy must be independent)")
    return tuple(out)


def _metadata(value: object, data_dir: Path) -> MetadataConfig:
    default_index = f"dir://{data_dir}/meta/index"
    if value is None:
        return MetadataConfig(uri=f"dir://{data_dir}/meta/records", index_uri=default_index)
    raw = _section(
        value,
        "metadata",
        ("uri", "index_uri", "replicas", "mode", "master", "sync_interval", "verify_interval"),
        "a mapping with uri, index_uri, replicas",
    )
    uri = _expect(raw.get("uri"), str, "metadata.uri", "a backend URI")
    # A replica gateway does not use the dedup index, so it may leave index_uri out.
    index_uri = _expect(
        raw.get("index_uri", default_index), str, "metadata.index_uri", "a backend URI (user-key namespace)"
    )
    replicas = tuple(_expect(raw.get("replicas") or [], list, "metadata.replicas", "a list of URIs"))
    master = _expect(raw.get("master", ""), str, "metadata.master", "a backend URI")
    mode = _expect(raw.get("mode", "seq"), str, "metadata.mode", "seq or user")
    if mode not in ("seq", "user"):
        raise ConfigError(f"config: metadata.mode: must be seq or user, got {mode!r}")
    checked = [("metadata.uri", uri), ("metadata.index_uri", index_uri)]
    checked += [(f"metadata.replicas[{i}]", r) for i, r in enumerate(replicas)]
    if master:
        checked.append(("metadata.master", master))
    for where, u in checked:
        try:
            parse_uri(_expect(u, str, where, "a backend URI"))
        except InvalidInput as exc:
            raise ConfigError(f"config: {where}: {exc}") from None
    if uri in replicas:
        raise ConfigError("config: metadata.replicas: a replica cannot be the master namespace (metadata.uri) itself")
    return MetadataConfig(
        uri=uri,
        index_uri=index_uri,
        replicas=replicas,
        mode=mode,
        master=master,
        sync_interval=_seconds_value(raw.get("sync_interval", 10.0), "metadata.sync_interval", positive=True),
        verify_interval=_seconds_value(raw.get("verify_interval", 86400.0), "metadata.verify_interval"),
    )


def _seconds_value(value: object, where: str, *, positive: bool = False) -> float:
    v = _expect(value, (int, float), where, "a number of seconds")
    if v < 0 or (positive and v == 0):
        raise ConfigError(f"config: {where}: must be {'positive' if positive else '>= 0 (0 = off)'}, got {v}")
    return float(v)


def _maint(value: object) -> MaintConfig:
    raw = _section(value or {}, "maint", (f.name for f in fields(MaintConfig)))
    d = MaintConfig()
    files_ps = _seconds_value(
        raw.get("scrub_files_per_second", d.scrub_files_per_second), "maint.scrub_files_per_second", positive=True
    )
    return MaintConfig(
        scrub_interval=_seconds_value(raw.get("scrub_interval", d.scrub_interval), "maint.scrub_interval"),
        scrub_files_per_second=files_ps,
        scrub_bytes_per_second=max(
            1, parse_size(raw.get("scrub_bytes_per_second", d.scrub_bytes_per_second), "maint.scrub_bytes_per_second")
        ),
        hard_every=_int(raw.get("hard_every", d.hard_every), "maint.hard_every", 1),
        cleanup_interval=_seconds_value(raw.get("cleanup_interval", d.cleanup_interval), "maint.cleanup_interval"),
        backup_interval=_seconds_value(raw.get("backup_interval", d.backup_interval), "maint.backup_interval"),
    )


def _tls(value: object) -> TlsConfig:
    raw = _section(value or {}, "tls", (f.name for f in fields(TlsConfig)))
    d = TlsConfig()
    internal = raw.get("internal")
    if internal == "auto":
        internal = None
    if internal is not None:
        _expect(internal, bool, "tls.internal", "true, false or auto")

    def path(name: str, default: Path | None) -> Path | None:
        v = raw.get(name)
        if v is None:
            return default
        text = _expect(v, str, f"tls.{name}", "a file path")
        if not text.strip():
            raise ConfigError(f"config: tls.{name}: expected a file path, got an empty string")
        return Path(text).expanduser()

    names = tuple(_expect(raw.get("names") or [], list, "tls.names", "a list of DNS names or IP addresses"))
    for i, name in enumerate(names):
        where = f"tls.names[{i}]"
        _expect(name, str, where, "a DNS name or IP address")
        if not re.fullmatch(r"[A-Za-z0-9*_.:-]{1,253}", name.strip("[]")):
            raise ConfigError(f"config: {where}: {name!r} is not a DNS name or IP address")
    edge_cert, edge_key = path("edge_cert", None), path("edge_key", None)
    if (edge_cert is None) != (edge_key is None):
        raise ConfigError("config: tls: edge_cert and edge_key go together (Envoy's own certificate and its key)")
    ca, cert, key = path("ca", d.ca), path("cert", d.cert), path("key", d.key)
    assert ca is not None and cert is not None and key is not None
    return TlsConfig(
        edge=_expect(raw.get("edge", d.edge), bool, "tls.edge", "true or false"),
        internal=internal,
        ca=ca,
        cert=cert,
        key=key,
        edge_cert=edge_cert,
        edge_key=edge_key,
        names=tuple(n.strip("[]") for n in names),
    )


def _address_list(value: object, where: str) -> tuple[str, ...]:
    items = _expect(value, list, where, "a list of IP addresses, networks (10.0.0.0/8) or host names")
    out = []
    for i, item in enumerate(items):
        text = _expect(item, str, f"{where}[{i}]", "an IP address, a network or a host name").strip()
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,253}", text):
                raise ConfigError(
                    f"config: {where}[{i}]: {text!r} is not an IP address, a network (10.0.0.0/8) or a host name"
                ) from None
        out.append(text)
    return tuple(out)


def _limits(value: object) -> LimitsConfig:
    raw = _section(value or {}, "limits", (f.name for f in fields(LimitsConfig)))
    d = LimitsConfig()

    def count(name: str, lo: int = 0, hi: int | None = None) -> int:
        return _int(raw.get(name, getattr(d, name)), f"limits.{name}", lo, hi)

    def rate(name: str) -> float:
        v = _expect(raw.get(name, getattr(d, name)), (int, float), f"limits.{name}", "requests per second")
        if v < 0:
            raise ConfigError(f"config: limits.{name}: must be >= 0 (0 = no limit), got {v}")
        return float(v)

    return LimitsConfig(
        uploads_per_identity=count("uploads_per_identity"),
        uploads_per_address=count("uploads_per_address"),
        rate_per_identity=rate("rate_per_identity"),
        burst_per_identity=count("burst_per_identity", 1),
        rate_per_address=rate("rate_per_address"),
        burst_per_address=count("burst_per_address", 1),
        upload_idle_timeout=_seconds_value(
            raw.get("upload_idle_timeout", d.upload_idle_timeout), "limits.upload_idle_timeout", positive=True
        ),
        exempt=_address_list(raw.get("exempt", list(d.exempt)) or [], "limits.exempt"),
        trusted_proxies=_address_list(
            raw.get("trusted_proxies", list(d.trusted_proxies)) or [], "limits.trusted_proxies"
        ),
        edge_max_connections=count("edge_max_connections", 1),
        edge_streams_per_connection=count("edge_streams_per_connection", 1, 2**31 - 1),
        edge_max_request_headers_kb=count("edge_max_request_headers_kb", 1, 8192),
        edge_request_headers_timeout=_seconds_value(
            raw.get("edge_request_headers_timeout", d.edge_request_headers_timeout),
            "limits.edge_request_headers_timeout",
            positive=True,
        ),
        edge_idle_timeout=_seconds_value(
            raw.get("edge_idle_timeout", d.edge_idle_timeout), "limits.edge_idle_timeout", positive=True
        ),
    )
