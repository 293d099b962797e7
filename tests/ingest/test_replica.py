"""A role: replica gateway refuses uploads before reading them: no spool file, no shard in the shared pool."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from tests.helpers import rpc_error
from tests.ingest.conftest import SuiteFactory


async def test_a_replica_refuses_uploads_up_front(suite_factory: SuiteFactory, tmp_path: Path) -> None:
    suite = await suite_factory(role="replica", metadata={"mode": "user", "uri": f"dir://{tmp_path}/replica"})
    failure = await rpc_error(suite.upload(os.urandom(300_000), "photo.jpg"))
    assert failure.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.details() == "this gateway is a read-only replica: an upload goes to the master gateway"
    assert suite.spool_files == []
    assert await suite.shard_count() == 0  # the pool it shares with its master: untouched
