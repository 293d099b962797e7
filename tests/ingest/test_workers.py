"""Worker processes: kill -9 mid-job (its slot's next process carries the job on), config hand-over."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import yaml

from gridstor.v1 import common_pb2
from services.common.config import build_config, dump_config
from tests.helpers import wait_until_async
from tests.ingest.conftest import MiB, SuiteFactory


async def test_killed_worker_job_is_resumed_by_its_slot_at_once(suite_factory: SuiteFactory) -> None:
    """SIGKILL mid-job: the worker restarted in that slot carries the job on within 10 s (no claim idle wait)."""
    # Tiny chunks make the store slow enough (about 256 chunks x 20 shards) to kill it midway. The claim
    # idle time keeps its default (60 s): only the restarted slot's own pending read can be that quick.
    suite = await suite_factory(workers=2, engine={"chunk_size": "16KiB"})
    data = os.urandom(4 * MiB)
    reply = await suite.upload(data, "big.bin")

    async def storing() -> bool:
        h = await suite.job_hash(reply.job)
        return int(h.get("progress") or 0) > 0 and bool(h.get("worker_pid"))

    await wait_until_async(storing, "a worker storing the job")
    before = await suite.job_hash(reply.job)
    victim = int(before["worker_pid"])
    os.kill(victim, signal.SIGKILL)

    status = await suite.wait(reply.job, seconds=10)
    assert status.state == common_pb2.JOB_STATE_DONE, (status.state, status.error)
    assert status.hash == reply.hash and status.file_id.startswith(reply.hash)
    h = await suite.job_hash(reply.job)
    assert h["attempts"] == "2" and int(h["worker_pid"]) != victim
    assert h["worker"] == before["worker"]  # the same slot's consumer took it up again
    assert await suite.download(status.file_id) == data
    assert suite.spool_files == []
    assert await suite.redis.xlen("gridstor:jobs") == 0
    pending = await suite.redis.xpending("gridstor:jobs", "workers")
    assert pending["pending"] == 0
    # The pool replaced the dead process.
    restarts = suite.registry.gauge("ingest_worker_restarts", "")
    await wait_until_async(restarts.value, "a worker restart counted", until=lambda n: n >= 1)
    workers = suite.registry.gauge("ingest_workers", "")
    await wait_until_async(workers.value, "two workers running", until=lambda n: n == 2)


async def test_config_hand_over_round_trips(tmp_path: Path) -> None:
    cfg = build_config(
        {
            "data_dir": str(tmp_path),
            "mode": "secret",
            "secret": "s" * 20,
            "allowlist": {"alice": "ab" * 32},
            "engine": {"chunk_size": "1MiB", "k": 4, "m": 2, "hedge_after": 0.5},
            "backends": [f"dir://{tmp_path}/d{i}" for i in range(6)],
            "metadata": {"uri": f"dir://{tmp_path}/m", "index_uri": f"dir://{tmp_path}/i", "replicas": []},
            "max_upload": "5MB",
            "workers": 3,
            "ports": {"meta": 9000},
            "redis": "redis://127.0.0.1:6390/2",
        }
    )
    assert build_config(yaml.safe_load(yaml.safe_dump(dump_config(cfg)))) == cfg  # what the workers read
