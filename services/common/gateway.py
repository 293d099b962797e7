"""Opening what a configured gateway stores into: the backend pool and the metadata store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial
from pathlib import Path

import grpc

from services.common import net, tls
from services.common.backends import Backend, Mode, open_backend
from services.common.backends.lazy import LazyBackend
from services.common.backends.uri import DirURI, parse_uri
from services.common.config import Config
from services.common.engine import BackendPool, Engine
from services.common.errors import BackendError, BackendUnavailable, Refused
from services.common.keys import master_key, signing_key
from services.common.metastore import MetaStore, Replica, ReplicatedMetaStore
from services.common.rpc import service_token

log = logging.getLogger(__name__)


REPLICA_REFUSAL = "this gateway is a read-only replica: {} goes to the master gateway"


def refuse_on_replica(cfg: Config, what: str) -> None:
    """Refused (FAILED_PRECONDITION) on a ``role: replica`` gateway: ``what`` would write into the shared pool.

    Called before anything is read or written, so a replica never leaves shards
    behind for a record it cannot store.
    """
    if cfg.role == "replica":
        raise Refused(REPLICA_REFUSAL.format(what))


def ensure_local_dirs(cfg: Config) -> None:
    """Create the parent folders of ``dir://`` backends that lie inside the data dir (the embedded layout).

    A dir backend refuses to create its folder when the parent is missing (a
    disk that is not mounted); inside the data dir the parent is ours to make.
    """
    uris = [b.uri for b in cfg.backends]
    if cfg.metadata is not None:
        uris += [cfg.metadata.uri, cfg.metadata.index_uri, *cfg.metadata.replicas]
    root = cfg.data_dir.absolute()
    for uri in uris:
        parsed = parse_uri(uri)
        if isinstance(parsed, DirURI):
            parent = Path(parsed.path).absolute().parent
            if parent == root or root in parent.parents:
                parent.mkdir(parents=True, exist_ok=True)


async def open_pool(cfg: Config) -> BackendPool:
    """Every configured shard backend.

    A backend that cannot be reached now does not stop the start (reads must
    work with up to m backends gone): it is logged and wrapped in a
    ``LazyBackend`` that keeps trying, behind an open circuit breaker. A
    malformed URI still fails at once. Each backend's identity marker is read
    (0-db: written into an empty namespace) as it opens.
    """

    ensure_local_dirs(cfg)

    async def one(uri: str) -> Backend:
        try:
            return await open_backend(uri, Mode.SEQ, marked=True)
        except BackendError as exc:
            log.error("backend unreachable at start, will retry on use: %s", exc)
            opener = partial(open_backend, uri, Mode.SEQ, marked=True)
            return LazyBackend(parse_uri(uri).redacted, Mode.SEQ, opener, exc)

    opened = await asyncio.gather(*(one(spec.uri) for spec in cfg.backends), return_exceptions=True)
    failures = [r for r in opened if isinstance(r, BaseException)]
    if failures:
        for b in opened:
            if isinstance(b, Backend):
                with contextlib.suppress(BackendError):
                    await b.close()
        raise failures[0]
    backends = {spec.name: b for spec, b in zip(cfg.backends, opened, strict=True) if isinstance(b, Backend)}
    pool = BackendPool(backends, cooldown=cfg.engine.backend_cooldown)
    down = [name for name, b in backends.items() if isinstance(b, LazyBackend)]
    for name in down:
        pool.failed(name, BackendUnavailable(name, "unreachable when the gateway started"))
    if len(down) > cfg.engine.m:
        log.error(
            "%d of %d backends are unreachable: files stay readable only while at most %d are down",
            len(down), len(backends), cfg.engine.m,
        )  # fmt: skip
    return pool


async def open_engine(cfg: Config) -> Engine:
    return Engine(await open_pool(cfg), master_key(cfg.data_dir), cfg.engine)


async def open_metastore(cfg: Config) -> MetaStore:
    """The metadata store ``cfg`` names: a master (with its replicas written through), or a replica read only.

    A master with ``metadata.replicas`` gets a ``ReplicatedMetaStore`` whose
    catch-up task is running; a replica that cannot be opened now is opened
    by that task later (it never stops the master). ``metadata.mode: user``
    (a ``role: replica`` gateway) opens ``metadata.uri`` as a replica
    namespace keyed by the master's ids, without the dedup index.
    """
    assert cfg.metadata is not None
    ensure_local_dirs(cfg)
    md = cfg.metadata
    if md.mode == "user":
        return MetaStore(await open_backend(md.uri, Mode.USER), None)
    records = await open_backend(md.uri, Mode.SEQ)
    try:
        index = await open_backend(md.index_uri, Mode.USER)
    except BaseException:
        await records.close()
        raise
    if not md.replicas or cfg.role != "master":
        return MetaStore(records, index)
    replicas: list[Replica] = []
    for uri in md.replicas:
        replica = Replica(uri, parse_uri(uri).redacted)
        try:
            replica.backend = await open_backend(uri, Mode.USER)
        except BackendError as exc:
            replica.error = str(exc)
            log.warning("metadata replica %s cannot be opened now (it will be caught up later): %s", replica.name, exc)
        replicas.append(replica)
    store = ReplicatedMetaStore(
        records,
        index,
        replicas,
        opener=open_backend,
        sync_interval=md.sync_interval,
        verify_interval=md.verify_interval,
    )
    store.start()
    return store


def channel(cfg: Config, service: str) -> grpc.aio.Channel:
    """A channel to one of the gateway's own services: TLS verified against ``tls.ca`` when ``cfg.internal_tls``.

    A wildcard listen address (0.0.0.0, ::) is dialled on loopback, the name the certificate carries.
    """
    ca = tls.ca_bytes(cfg) if cfg.internal_tls else None
    return net.aio_channel(net.dial(cfg.address(service)), tls=cfg.internal_tls, ca=ca)


class ServiceCredentials:
    """Call metadata carrying a service token for internal methods, as ``service:<name>``.

    The token is minted once and renewed hourly (tokens live a day), so a
    long-running caller stays authorized without reading the key per call.
    """

    REFRESH = 3600.0

    def __init__(self, cfg: Config, name: str) -> None:
        self._key = signing_key(cfg.data_dir)
        self._name = name
        self._md: tuple[tuple[str, str]] | None = None
        self._at = 0.0

    def __call__(self) -> tuple[tuple[str, str]]:
        now = time.monotonic()
        if self._md is None or now - self._at > self.REFRESH:
            self._md = (("authorization", "Bearer " + service_token(self._key, self._name)),)
            self._at = now
        return self._md


def service_metadata(cfg: Config, name: str) -> tuple[tuple[str, str]]:
    """One-off call metadata with a fresh service token (see ServiceCredentials for long-running callers)."""
    return ServiceCredentials(cfg, name)()
