"""Upload -> job -> worker -> meta, end to end: sizes, dedup, receipts, metrics."""

from __future__ import annotations

import asyncio
import os

import blake3
from nacl.signing import VerifyKey

from gridstor.v1 import common_pb2, meta_pb2
from services.common.keys import key_id, signing_key
from services.ingest.worker import RECEIPT_DOMAIN
from tests.helpers import wait_until_async
from tests.ingest.conftest import MiB, Suite, SuiteFactory


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest(24)


def verify_receipt(key: VerifyKey, receipt: common_pb2.Receipt) -> common_pb2.ReceiptBody:
    key.verify(RECEIPT_DOMAIN + receipt.body, receipt.signature)  # raises on a bad signature
    assert receipt.key_id == key_id(key)
    body = common_pb2.ReceiptBody()
    body.ParseFromString(receipt.body)
    return body


async def test_sizes_round_trip(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    verify_key = signing_key(suite.cfg.data_dir).verify_key
    cases = [
        (b"", "empty"),
        (b"x", "one.TXT"),
        (os.urandom(5 * MiB), "photo.JPG"),
        (os.urandom(20 * MiB + 12345), "backup.tar.gz"),
    ]
    for data, name in cases:
        reply = await suite.upload(data, name)
        assert len(reply.job) == 32 and reply.size == len(data) and reply.hash == digest(data)
        status = await suite.wait(reply.job)
        assert status.state == common_pb2.JOB_STATE_DONE, status.error
        ext = {"empty": "", "one.TXT": ".txt", "photo.JPG": ".jpg", "backup.tar.gz": ".tar.gz"}[name]
        assert status.file_id.startswith(digest(data)) and status.file_id.endswith(ext)
        assert len(status.file_id) == 56 + len(ext)
        assert status.result == status.file_id
        assert (status.size, status.hash, status.deduplicated) == (len(data), digest(data), False)
        assert status.progress_bytes == len(data)
        body = verify_receipt(verify_key, status.receipt)
        assert (body.file_id, body.size, body.hash, body.job) == (status.file_id, len(data), digest(data), reply.job)
        assert await suite.download(status.file_id) == data
    assert suite.spool_files == []

    stat = await suite.meta.Stat(meta_pb2.StatRequest(id=(await suite.wait(reply.job)).file_id))
    assert stat.info.content_type == "application/gzip"  # derived from .tar.gz

    await wait_until_async(lambda: _metric(suite, "ingest_jobs_done_total", 4), "4 jobs counted done")
    assert await _metric(suite, "ingest_uploads_total", 4, result="ok")
    assert await _metric(suite, "ingest_bytes_received_total", 1 + 5 * MiB + 20 * MiB + 12345)
    assert await _metric(suite, "ingest_bytes_stored_total", 1 + 5 * MiB + 20 * MiB + 12345)
    assert await _metric(suite, "ingest_queue_length", 0)
    assert "gridstor_ingest_workers 1" in suite.registry.render()


async def _metric(suite: Suite, name: str, value: float, **labels: str) -> bool:
    """Whether the ingest metric ``name`` reads ``value`` (compared as numbers: render() rounds big ones)."""
    registry = suite.registry
    metric = registry.gauge(name, "") if name in ("ingest_queue_length",) else registry.counter(name, "")
    return bool(metric.value(**labels) == value)


async def test_content_type_given_or_from_body(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    reply = await suite.upload(b"<svg/>", "pic.svg", content_type="text/plain")
    done = await suite.wait(reply.job)
    stat = await suite.meta.Stat(meta_pb2.StatRequest(id=done.file_id))
    assert stat.info.content_type == "text/plain"
    assert stat.info.ext == ".svg"


async def test_dedup_answers_each_upload_with_its_extension(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    data = os.urandom(20_000)
    first = await suite.wait((await suite.upload(data, "x.bin")).job)
    reply = await suite.upload(data, "photo.PNG", content_type="image/x-test")
    assert (reply.name, reply.ext, reply.note) == ("photo.PNG", ".png", "")
    second = await suite.wait(reply.job)
    key = first.file_id.removesuffix(".bin")
    assert second.deduplicated and second.file_id == key + ".png"
    assert (await suite.wait((await suite.upload(data, "noext")).job)).file_id == first.file_id
    types = {}
    for file_id in (key, key + ".bin", key + ".png"):
        messages = [m async for m in suite.meta.Download(meta_pb2.DownloadRequest(id=file_id))]
        types[file_id[56:]] = messages[0].content_type
    assert types == {"": "application/octet-stream", ".bin": "application/octet-stream", ".png": "image/x-test"}


async def test_a_name_whose_extension_an_id_cannot_carry_is_stored_without_one(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    reply = await suite.upload(b"tarred", "y.t@r")
    assert reply.ext == "" and "'.t@r' cannot be part of a file id" in reply.note
    done = await suite.wait(reply.job)
    assert done.file_id == reply.hash + done.file_id[48:56]


async def test_dedup_stores_once(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(workers=2)
    data = os.urandom(5 * MiB)
    first = await suite.wait((await suite.upload(data, "a.bin")).job)
    assert first.state == common_pb2.JOB_STATE_DONE and not first.deduplicated
    shards = await suite.shard_count()
    assert shards == 20 * 20  # 5 MiB in 256 KiB chunks, 16+4 shards each

    second = await suite.wait((await suite.upload(data, "other-name.bin")).job)
    assert second.state == common_pb2.JOB_STATE_DONE
    assert second.deduplicated and second.file_id == first.file_id
    assert await suite.shard_count() == shards

    # Two identical uploads at once: both workers may miss FindByHash; PutRecord dedups and one set goes.
    fresh = os.urandom(3 * MiB)
    replies = await asyncio.gather(suite.upload(fresh, "x.bin"), suite.upload(fresh, "x.bin"))
    results = [await suite.wait(r.job) for r in replies]
    assert results[0].file_id == results[1].file_id
    assert sum(r.deduplicated for r in results) == 1
    assert await suite.shard_count() == shards + 12 * 20
    assert await suite.download(results[0].file_id) == fresh
    await wait_until_async(lambda: _metric(suite, "ingest_dedup_hits_total", 2), "2 dedup hits counted")
