"""Real 0-db servers for the benchmarks (bench/e2e.py and bench/engine.py ``--backend zdb``).

A ``ZdbFarm`` starts ``processes`` zdb servers from ``ZDB_BIN`` (or ``zdb`` on PATH),
each holding ``per_process`` sequential namespaces, and optionally one more server
holding the metadata namespaces (records: sequential, hash index: user-key). Backends
are named b00, b01, ... in order, server p holding b{p*per_process} onwards: with the
default 5 x 4 and 16+4 coding, a file's shards go to 20 consecutive backends (in
config order, from a random start), so its 4 parity shards sit on at most two servers
and at least three servers hold nothing but data shards of it. Taking one of those
down (SIGKILL, ``kill``) takes 4 data-holding backends away for real, as a lost node
would; ``restart`` brings it back on the same data and port.

The servers are ``tests.zdb_server.ZdbProcess`` (the tests' own), each started so it
gets SIGTERM if the benchmark dies. Nothing of 0-db itself lives in this repository.

Unless asked not to (``tuned=False``), the servers run with ``ZDB_MALLOC_ENV``: 0-db
answers a GET by reading the value into a malloc'd buffer and copying it into a
second one for the reply; above 128 KiB glibc serves each with a fresh mmap, and the
page faults made a 256 KiB GET cost ~320 us of zdb CPU here against ~95 us with the
thresholds raised (the same thresholds services/common/tuning.py sets for gridstor's
own processes). A deployment runs its 0-db servers the same way (docs/engine.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from pathlib import Path
from typing import Any

from services.launcher.children import dying_with_parent
from tests.zdb_server import ZdbProcess, zdb_binary

MIB = 1024 * 1024
DATASIZE = 64 * MIB  # 0-db fallocates this for every namespace and every new datafile
MISSING = (
    "--backend zdb needs a 0-db binary: set ZDB_BIN to a zdb executable (or put zdb on PATH);"
    " 0-db is not packaged, build it from https://github.com/threefoldtech/0-db"
)
ZDB_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * MIB), "MALLOC_TRIM_THRESHOLD_": str(64 * MIB)}
"""glibc malloc settings for the zdb servers (docs/engine.md, "0-db speed"): each GET mallocs two buffers of
the value's size, which glibc serves with fresh mmap (page faults, zeroing) above 128 KiB."""
RECORDS_NS = "bench-meta"
INDEX_NS = "bench-index"


class ZdbMissing(Exception):
    """No zdb binary (the message names ZDB_BIN)."""


class _BenchZdb(ZdbProcess):
    """A tests' ZdbProcess whose server gets SIGTERM when the benchmark that started it dies."""

    def __init__(self, binary: str, root: Path) -> None:
        super().__init__(binary, root, datasize=DATASIZE)

    def argv(self) -> list[str]:
        return dying_with_parent(super().argv(), threads=True)[0]  # restarted while the benchmark has threads


class ZdbFarm:
    """``processes`` x ``per_process`` sequential namespaces (+ a metadata server); see the module docstring."""

    def __init__(
        self, binary: str, root: Path, processes: int, per_process: int, metadata: bool, tuned: bool = True
    ) -> None:
        self.root = root
        self.per_process = per_process
        self.servers: list[ZdbProcess] = [_BenchZdb(binary, root / f"zdb{p}") for p in range(processes)]
        self.meta_server: ZdbProcess | None = _BenchZdb(binary, root / "zdb-meta") if metadata else None
        for server in self.every_server:
            server.env = {**os.environ, **ZDB_MALLOC_ENV} if tuned else None

    @classmethod
    def start(
        cls, root: Path, processes: int = 5, per_process: int = 4, metadata: bool = True, tuned: bool = True
    ) -> ZdbFarm:
        """Start every server and make its namespaces; ZdbMissing (naming ZDB_BIN) without a binary.

        ``tuned``: the servers run with ZDB_MALLOC_ENV (see the module docstring); False: glibc's defaults.
        """
        binary = zdb_binary()
        if binary is None:
            raise ZdbMissing(MISSING)
        farm = cls(binary, root, processes, per_process, metadata, tuned)
        try:
            for server in farm.every_server:
                server.start()
            farm._run(farm._make_namespaces())
        except BaseException:
            farm.stop()
            raise
        return farm

    @property
    def every_server(self) -> list[ZdbProcess]:
        return self.servers + ([self.meta_server] if self.meta_server is not None else [])

    @staticmethod
    def _run(coro: object) -> None:
        """Run a coroutine on its own loop in a thread (the caller may be inside an event loop)."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, coro).result()  # type: ignore[arg-type]

    async def _make_namespaces(self) -> None:
        from services.common.backends.base import Mode
        from services.common.backends.zdb import ensure_namespace

        for p, server in enumerate(self.servers):
            for i in range(self.per_process):
                await ensure_namespace(server.host, server.port, self.namespace(p, i), mode=Mode.SEQ)
        if self.meta_server is not None:
            s = self.meta_server
            await ensure_namespace(s.host, s.port, RECORDS_NS, mode=Mode.SEQ)
            await ensure_namespace(s.host, s.port, INDEX_NS, mode=Mode.USER)

    def namespace(self, p: int, i: int) -> str:
        return f"bench-b{p * self.per_process + i:02d}"

    @property
    def backends(self) -> dict[str, str]:
        """Backend name -> zdb:// URI, b00 first."""
        out = {}
        for p, server in enumerate(self.servers):
            for i in range(self.per_process):
                n = p * self.per_process + i
                out[f"b{n:02d}"] = f"zdb://{server.host}:{server.port}/{self.namespace(p, i)}"
        return out

    def metadata_uris(self) -> tuple[str, str]:
        """(records URI, hash index URI) on the metadata server."""
        s = self.meta_server
        if s is None:
            raise ValueError("this farm has no metadata server")
        return f"zdb://{s.host}:{s.port}/{RECORDS_NS}", f"zdb://{s.host}:{s.port}/{INDEX_NS}"

    def names_on(self, p: int) -> list[str]:
        return [f"b{p * self.per_process + i:02d}" for i in range(self.per_process)]

    def server_holding_only(self, names: set[str]) -> int | None:
        """A server all of whose backends are in ``names`` (e.g. the data holders of a file), or None."""
        for p in range(len(self.servers)):
            if set(self.names_on(p)) <= names:
                return p
        return None

    def config(self, raw: dict[str, Any]) -> None:
        """Point a gridstor config mapping (the launcher's YAML) at this farm: backends and metadata."""
        raw["backends"] = [{"name": name, "uri": uri} for name, uri in self.backends.items()]
        if self.meta_server is not None:
            records, index = self.metadata_uris()
            metadata = raw.setdefault("metadata", {})
            assert isinstance(metadata, dict)
            metadata["uri"], metadata["index_uri"] = records, index

    def pids(self) -> dict[str, int]:
        """Process name (zdb0, ..., zdb-meta) -> pid, for CPU accounting."""
        out = {}
        for server in self.every_server:
            proc = server._proc
            if proc is not None:
                out[server.root.name] = proc.pid
        return out

    def stop(self) -> None:
        for server in self.every_server:
            with contextlib.suppress(Exception):
                server.stop()


def zdb_available() -> bool:
    return zdb_binary() is not None


__all__ = ["MISSING", "ZdbFarm", "ZdbMissing", "zdb_available"]
