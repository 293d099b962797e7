"""The whole gateway killed with SIGKILL while streamed uploads arrive: started again, it serves at once.

Real launcher, real processes, real SIGKILL of every one of them at the same moment (a power cut, as far
as the processes can tell). Uploads that were still arriving can never complete: they end at once with a
clear reason instead of holding workers, and a new 1 MB upload is stored within 5 s of being sent.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from gridstor.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from services.common import jobs, net
from services.common.config import Config, load_config
from services.ingest.upload import STREAM_FROM
from tests.cli.launcher_proc import Launcher, alive, children_of, write_config
from tests.helpers import wait_until
from tests.ingest.conftest import requests

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


def stalled_upload(data: bytes, sent: threading.Event, release: threading.Event) -> Iterator[ingest_pb2.UploadRequest]:
    """A big upload (its size declared) that sends ``data`` and then waits, as a client on a slow link would."""
    yield from requests(data, "stalled.bin", declared_size=64 * MiB)
    sent.set()
    release.wait(120)


def receiving_jobs(cfg: Config) -> list[str]:
    client = redis.Redis.from_url(cfg.redis_url, decode_responses=True)
    try:
        out = []
        for key in client.scan_iter(jobs.JOB_PREFIX + "*"):
            if client.hget(key, "receiving") == "1" and client.hget(key, "worker"):
                out.append(str(key)[len(jobs.JOB_PREFIX) :])
        return out
    finally:
        client.close()


def test_after_a_full_sigkill_new_uploads_are_not_held_up(tmp_path: Path, launched: list[Launcher]) -> None:
    data = tmp_path / "data"
    cfg = load_config(write_config(data), data_dir=data)
    first = Launcher(data)
    launched.append(first)
    first.wait_up()

    # Two streamed uploads in flight: queued as jobs, their workers storing what arrived so far.
    address = net.hostport("127.0.0.1", cfg.ports["ingest"])
    release = threading.Event()
    calls = []
    for _ in range(2):
        sent = threading.Event()
        channel = grpc.insecure_channel(address)
        future = ingest_pb2_grpc.IngestServiceStub(channel).Upload.future(
            stalled_upload(os.urandom(STREAM_FROM + MiB), sent, release)
        )
        calls.append((channel, future, sent))
    try:
        for _, _, sent in calls:
            assert sent.wait(60)
        wait_until(lambda: receiving_jobs(cfg), "both uploads queued and taken by workers", until=lambda j: len(j) == 2)
        cut = receiving_jobs(cfg)

        # SIGKILL every process of the gateway at once: the launcher, redis, the services, the workers, Envoy.
        everyone = [first.proc.pid, *children_of(first.proc.pid)]
        for pid in everyone:
            os.kill(pid, signal.SIGKILL)
        first.wait(60)
        wait_until(lambda: [p for p in everyone if alive(p)], "every process gone", until=lambda left: left == [])
    finally:
        release.set()
        for channel, future, _ in calls:
            future.cancel()  # type: ignore[no-untyped-call]
            channel.close()

    second = Launcher(data)
    launched.append(second)
    second.wait_up()

    # A new 1 MB upload is stored within 5 s of its first byte, right after the start ...
    put_within(address, 5.0)
    # ... the uploads the crash cut off end at once with the reason (no claim or stall timeout) ...
    client = redis.Redis.from_url(cfg.redis_url, decode_responses=True)
    try:
        for job in cut:

            def job_hash(job: str = job) -> dict[str, str]:
                return client.hgetall(jobs.job_key(job))  # type: ignore[return-value]

            h = wait_until(
                job_hash,
                "the cut-off upload's job to end",
                until=lambda h: h.get("state") == jobs.ERROR,
                within=10,
            )
            assert "its upload was cut off: the ingest process receiving it (pid" in h["error"], h
        wait_until(lambda: client.xlen(jobs.STREAM), "the queue to be empty", until=lambda n: n == 0, within=10)
    finally:
        client.close()
    # ... and once they are gone, uploads are as quick.
    put_within(address, 5.0)
    wait_until(lambda: sorted(os.listdir(cfg.spool_dir)), "an empty spool", until=lambda f: f == [])
    assert second.terminate() == 0, second.stderr


def put_within(address: str, seconds: float) -> None:
    """Upload 1 MB and wait for its job: DONE within ``seconds`` of the first byte (the calls' deadlines)."""
    with grpc.insecure_channel(address) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        payload = os.urandom(1_000_000)
        deadline = time.monotonic() + seconds
        reply = stub.Upload(iter(requests(payload, "after.bin")), timeout=seconds)
        left = deadline - time.monotonic()
        assert left > 0, "the upload alone took the whole time"
        status = stub.Status(
            ingest_pb2.StatusRequest(job=reply.job, wait=True, timeout_seconds=max(1, int(left))), timeout=left + 0.5
        )
        assert status.state == common_pb2.JOB_STATE_DONE, (status.state, status.error)
