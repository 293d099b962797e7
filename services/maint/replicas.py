"""ReplicaStatus: how far each metadata replica is behind the master.

The replicator itself runs in meta (``services.common.metastore.ReplicatedMetaStore``:
meta is the master's only writer, so write-through and catch-up are ordered by
one lock there). This module only reads: it lists the ids in the master and in
each replica and compares them.

A replica's ``last_id`` is the highest master id up to which the replica holds
*every* master record, not merely its highest key: write-through keeps storing
new records while a replica is still missing older ones, and the status must
not call such a replica in sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.common.backends import Backend, Mode, open_backend, parse_uri
from services.common.backends.base import SEQ_KEY_SIZE, seq_id
from services.common.config import Config
from services.common.errors import BackendError, GridstorError

log = logging.getLogger(__name__)

Opener = Callable[[str, Mode], Awaitable[Backend]]
TIMEOUT = 60.0  # listing a large namespace takes a while; a dead one fails much sooner


@dataclass
class ReplicaInfo:
    """One replica namespace as ReplicaStatus reports it."""

    name: str
    reachable: bool = False
    last_id: int = -1  # -1: holds no complete prefix of the master
    entries: int = 0
    lag: int = 0
    error: str = ""


@dataclass
class ReplicaReport:
    """The master and every replica."""

    role: str
    master_reachable: bool = False
    master_last_id: int = -1  # -1: the master holds no record (or is unreachable)
    master_entries: int = 0
    replicas: list[ReplicaInfo] = field(default_factory=list)

    @property
    def in_sync(self) -> bool:
        return self.master_reachable and all(r.reachable and r.last_id == self.master_last_id for r in self.replicas)


async def _ids(opener: Opener, uri: str, mode: Mode) -> list[int]:
    """Sorted record ids in a namespace (seq: its keys; replica: its 8-byte keys)."""
    backend = await opener(uri, mode)
    try:
        async with asyncio.timeout(TIMEOUT):
            keys = [k async for k in backend.scan()]
    finally:
        with contextlib.suppress(BackendError):
            await backend.close()
    return sorted(seq_id(k) for k in keys if len(k) == SEQ_KEY_SIZE)


def _contiguous(master: list[int], held: set[int]) -> int:
    """Highest master id up to which ``held`` has every master id; -1 when it lacks the first."""
    last = -1
    for meta_id in master:
        if meta_id not in held:
            break
        last = meta_id
    return last


async def replica_status(cfg: Config, opener: Opener = open_backend) -> ReplicaReport:
    """Compare the master's ids with each replica's (a replica gateway: its own replica and, if named, the master)."""
    assert cfg.metadata is not None
    md = cfg.metadata
    report = ReplicaReport(role=cfg.role)
    if cfg.role == "master":
        master_uri: str = md.uri
        replica_uris = list(md.replicas)
    else:
        master_uri = md.master
        replica_uris = [md.uri] if md.mode == "user" else []
    master_ids: list[int] = []
    if master_uri:
        try:
            master_ids = await _ids(opener, master_uri, Mode.SEQ)
            report.master_reachable = True
            report.master_entries = len(master_ids)
            report.master_last_id = master_ids[-1] if master_ids else -1
        except (GridstorError, TimeoutError) as exc:
            log.warning("metadata master %s cannot be listed: %s", parse_uri(master_uri).redacted, exc)
    for uri in replica_uris:
        info = ReplicaInfo(name=parse_uri(uri).redacted)
        try:
            ids = await _ids(opener, uri, Mode.USER)
        except (GridstorError, TimeoutError) as exc:
            info.error = str(exc) or "no answer"
            report.replicas.append(info)
            continue
        info.reachable = True
        info.entries = len(ids)
        if report.master_reachable:
            info.last_id = _contiguous(master_ids, set(ids))
            info.lag = report.master_last_id - info.last_id
        else:
            info.last_id = ids[-1] if ids else -1
        report.replicas.append(info)
    return report
