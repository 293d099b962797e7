"""Upload refusals: size limits, declared sizes, cancellation, tokens; nothing is left in the spool."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import grpc
from google.api import httpbody_pb2
from google.rpc import error_details_pb2, status_pb2

from gridstor.v1 import common_pb2, ingest_pb2
from tests.helpers import login_token, rpc_error, wait_until_async
from tests.ingest.conftest import MESSAGE, MiB, Suite, SuiteFactory, requests


def uploads(suite: Suite, result: str) -> float:
    return suite.registry.counter("ingest_uploads_total", "").value(result=result)


def error_details(err: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The google.rpc details of a refusal (grpc-status-details-bin), by type name."""
    trailers: Any = err.trailing_metadata() or ()  # (key, value) pairs
    raw = dict(trailers).get("grpc-status-details-bin")
    assert isinstance(raw, bytes), err.trailing_metadata()
    status = status_pb2.Status.FromString(raw)
    assert (status.code, status.message) == (err.code().value[0], err.details())
    out: dict[str, Any] = {}
    for item in status.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo):
            if item.TypeName() == cls.DESCRIPTOR.full_name:
                msg = cls()
                item.Unpack(msg)
                out[cls.DESCRIPTOR.name] = msg
    return out


async def test_over_the_limit(suite_factory: SuiteFactory) -> None:
    """Not RESOURCE_EXHAUSTED, which clients may retry: the same upload can never fit."""
    suite = await suite_factory(max_upload="1MiB")
    err = await rpc_error(suite.upload(os.urandom(MiB + 1)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "the upload is over the upload limit of 1048576 bytes"
    details = error_details(err.error)
    assert details["ErrorInfo"].reason == "TOO_LARGE" and dict(details["ErrorInfo"].metadata) == {
        "limit_bytes": "1048576"
    }
    violation = details["BadRequest"].field_violations[0]
    assert (violation.field, violation.description) == ("body", err.details())
    assert suite.spool_files == []
    # Exactly at the limit is fine.
    reply = await suite.upload(os.urandom(MiB))
    assert (await suite.wait(reply.job)).state == common_pb2.JOB_STATE_DONE
    assert uploads(suite, "refused") == 1


async def test_declared_size_refused_before_any_data(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(max_upload="1MiB")
    call = suite.ingest.Upload(None)
    await call.write(ingest_pb2.UploadRequest(name="big.iso", declared_size=MiB + 1))
    # No data and no half-close from us: the server answers from the header alone.
    err = await rpc_error(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "declared_size 1048577 bytes is over the upload limit of 1048576 bytes"
    assert error_details(err.error)["BadRequest"].field_violations[0].field == "declared_size"
    assert suite.spool_files == []


async def test_declared_size_mismatch(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    for declared in (10, 3):
        err = await rpc_error(suite.upload(b"12345", declared_size=declared))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        expected = "more bytes arrived than the declared_size" if declared < 5 else "but 5 bytes arrived"
        assert expected in (err.details() or "")
    err = await rpc_error(suite.upload(b"1", declared_size=-1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert suite.spool_files == []
    ok = await suite.upload(b"12345", declared_size=5)
    assert (await suite.wait(ok.job)).state == common_pb2.JOB_STATE_DONE


async def test_cancel_mid_upload_leaves_nothing(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    call = suite.ingest.Upload(None)
    chunk = os.urandom(MESSAGE)
    await call.write(ingest_pb2.UploadRequest(name="partial.bin", body=httpbody_pb2.HttpBody(data=chunk)))
    for _ in range(7):  # 2 MiB: at least one batch reached the disk
        await call.write(ingest_pb2.UploadRequest(body=httpbody_pb2.HttpBody(data=chunk)))

    def partial_on_disk() -> bool:
        files = suite.spool_files
        return bool(files) and os.path.getsize(suite.cfg.spool_dir / files[0]) > 0

    await wait_until_async(partial_on_disk, "part of the upload on disk in the spool")
    call.cancel()
    await wait_until_async(lambda: suite.spool_files, "the spool to be empty", until=lambda f: f == [])
    await wait_until_async(lambda: uploads(suite, "cancelled"), "a cancelled upload counted", until=lambda n: n == 1)
    assert await suite.redis.keys("gridstor:job:*") == []  # no job was queued for the partial upload


async def test_secret_mode_needs_a_token_for_upload_only(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(mode="secret", secret="correct horse battery staple")
    err = await rpc_error(suite.upload(b"data"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    bad = (("authorization", "Bearer gs1.forged.token"),)
    assert (await rpc_error(suite.upload(b"data", metadata=bad))).code() == grpc.StatusCode.UNAUTHENTICATED
    assert suite.spool_files == []

    token = login_token(suite.cfg, "alice")
    reply = await suite.upload(b"data", "a.txt", metadata=(("authorization", f"Bearer {token}"),))
    # Status is public: no token needed.
    status = await suite.wait(reply.job)
    assert status.state == common_pb2.JOB_STATE_DONE
    assert (await suite.job_hash(reply.job))["identity"] == "alice"


async def test_public_mode_records_no_identity(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    reply = await suite.ingest.Upload(iter(requests(b"abc", "x")))
    assert (await suite.job_hash(reply.job))["identity"] == ""


async def test_bad_header(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    err = await rpc_error(suite.upload(b"abc", "x" * 2000))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "name is 2000 characters" in (err.details() or "")
    err = await rpc_error(suite.upload(b"abc", "a\nb.txt"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert suite.spool_files == []


async def test_start_sweeps_leftovers(suite_factory: SuiteFactory, tmp_path: Path) -> None:
    """Partial uploads and spool files of unknown jobs left by a crash are removed at start."""
    spool_dir = tmp_path / "data0" / "spool"  # the first suite's data dir
    spool_dir.mkdir(parents=True)
    stale, fresh, orphan = spool_dir / "up-x.part", spool_dir / "up-y.part", spool_dir / ("ab" * 16 + ".spool")
    for p in (stale, fresh, orphan):
        p.write_bytes(b"x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    suite = await suite_factory()
    assert suite.spool_files == [fresh.name]


async def test_uploads_past_the_process_cap_wait_unread_then_get_busy(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(limits={"uploads_per_process": 1, "busy_wait": 2.0})
    holder = suite.ingest.Upload(None)  # holds the only slot: sends a first message and waits
    await holder.write(requests(b"x" * 1000, "held.bin")[0])

    async def counted() -> float:
        return suite.registry.counter("ingest_bytes_received_total", "").value()

    await wait_until_async(counted, "the first upload's bytes received", until=lambda n: n >= 1000)
    err = await rpc_error(suite.upload(b"second", "second.bin"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details().startswith("the gateway is at its limit of 1 concurrent uploads in this ingest process")
    assert err.trailers()["gridstor-error"] == "Busy"
    assert await counted() == 1000  # the refused upload's bytes were never read

    waiting = asyncio.ensure_future(suite.upload(b"third", "third.bin"))  # waits, unread, for the slot ...
    await holder.done_writing()
    assert (await holder).size == 1000  # ... which the first frees as it ends
    third = await asyncio.wait_for(waiting, 30)
    assert (await suite.wait(third.job)).state == common_pb2.JOB_STATE_DONE
