"""The job store in Redis: one hash per job, a Stream of work, a notice when a job ends.

Keys (``redis.asyncio``, strings decoded as UTF-8):

* ``gridstor:job:<id>``     hash: state (ACTIVE / DONE / ERROR), name, ext, content_type,
  size, hash (hex), spool (path), remove (1 = delete the spool file when done),
  identity, created, progress, file_id, error, dedup, receipt (hex of a serialized
  Receipt), attempts, worker, worker_pid, updated, receiving (1 = the upload is still
  arriving in the spool file: size and hash are set once it is complete), ingest (the
  ingest process receiving a ``receiving`` upload: services/ingest/liveness.py), waiting (why
  an ACTIVE job does not progress now, e.g. meta unreachable; absent when it does). Finished
  jobs expire after ``JOB_TTL``; uploads aborted while receiving after ``ABORTED_TTL``.
* ``gridstor:jobs``         Stream of ``{job: <id>}`` read by the consumer group ``workers``.
  An entry is acknowledged and deleted once its job ended, so the stream length is
  the number of queued plus running jobs. Each worker slot has a stable consumer
  name, so a worker restarted in that slot reads its predecessor's pending entries
  first (``read_pending``); an entry whose worker is gone for good stays pending
  and is taken over with XAUTOCLAIM; a live worker keeps its entries fresh with a
  heartbeat (XCLAIM to itself), so only dead workers' entries go idle.
* ``gridstor:jobdone:<id>`` pub/sub channel: a message when the job ends.
* ``gridstor:ingest:stats`` hash of counters kept by the workers (done, failed, dedup,
  bytes_stored), mirrored into the ingest service's metrics.
* ``gridstor:worker:<consumer>`` a store worker's last readiness report (``1`` or ``0 <why>``),
  renewed every few seconds and expiring otherwise; ingest's health follows its workers' reports.

Shared by the services that queue uploads: ingest (Upload, its store workers) and
ssh (Process queues a file of a home with ``submit``). Nothing here imports grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from services.common import errors

log = logging.getLogger(__name__)

JOB_PREFIX = "gridstor:job:"
STREAM = "gridstor:jobs"
GROUP = "workers"
CHANNEL_PREFIX = "gridstor:jobdone:"
STATS = "gridstor:ingest:stats"
WORKER_PREFIX = "gridstor:worker:"
JOB_TTL = 7 * 86400  # finished jobs answer Status this long
ABORTED_TTL = 3600  # an aborted upload's job id was never handed out: keep it only for the worker to see
ABORTED = "aborted: "  # error prefix of a job whose upload failed while it was being stored

ACTIVE = "ACTIVE"
DONE = "DONE"
ERROR = "ERROR"

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")

# Refresh the idle time of a pending entry only while this consumer still owns it.
_HEARTBEAT = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""

# Drop consumers (dead workers) with nothing pending that were idle long enough.
# Atomic, so an entry delivered between the check and the delete cannot be lost.
_PRUNE = """
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    n = n + 1
  end
end
return n
"""


def checkpoint() -> None:
    """Raise CancelledError if this task was asked to stop, even if a library swallowed the request."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any], step: float = 0.1) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again while it keeps running.

    redis-py's asyncio client (8.1 here) can swallow a cancellation that lands
    while it connects or sends a command (the family of redis/redis-py#2028 and
    #2551), so one ``cancel()`` is not always enough; a repeated one lands on a
    later await.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=step)
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %s ended with %r while being cancelled", task.get_name(), task.exception())


def new_job_id() -> str:
    """A random 128-bit job id, 32 lowercase hex."""
    return os.urandom(16).hex()


def check_job_id(text: str) -> str:
    """The job id, or InvalidInput naming what is wrong."""
    if not _JOB_ID.match(text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise errors.InvalidInput(f"job id must be 32 lowercase hex characters, got {shown!r}")
    return text


def job_key(job: str) -> str:
    return JOB_PREFIX + job


def channel(job: str) -> str:
    return CHANNEL_PREFIX + job


@dataclass(frozen=True)
class Job:
    """A job as stored in its hash."""

    id: str
    state: str
    name: str = ""
    ext: str = ""
    content_type: str = ""
    size: int = 0
    hash: str = ""
    spool: str = ""
    remove: bool = True
    identity: str = ""
    created: float = 0.0
    progress: int = 0
    file_id: str = ""
    error: str = ""
    dedup: bool = False
    receipt: bytes = b""
    attempts: int = 0
    worker: str = ""
    receiving: bool = False
    ingest: str = ""
    waiting: str = ""

    @property
    def finished(self) -> bool:
        return self.state in (DONE, ERROR)

    @property
    def aborted(self) -> bool:
        """Whether the upload failed while the job was already queued (nobody has its id)."""
        return self.state == ERROR and self.error.startswith(ABORTED)

    @classmethod
    def from_hash(cls, job: str, h: Mapping[str, str]) -> Job:
        def num(key: str) -> int:
            try:
                return int(h.get(key) or 0)
            except ValueError:
                return 0

        try:
            receipt = bytes.fromhex(h.get("receipt", ""))
        except ValueError:
            receipt = b""
        return cls(
            id=job,
            state=h.get("state", ACTIVE),
            name=h.get("name", ""),
            ext=h.get("ext", ""),
            content_type=h.get("content_type", ""),
            size=num("size"),
            hash=h.get("hash", ""),
            spool=h.get("spool", ""),
            remove=h.get("remove", "1") == "1",
            identity=h.get("identity", ""),
            created=float(h.get("created") or 0),
            progress=num("progress"),
            file_id=h.get("file_id", ""),
            error=h.get("error", ""),
            dedup=h.get("dedup") == "1",
            receipt=receipt,
            attempts=num("attempts"),
            worker=h.get("worker", ""),
            receiving=h.get("receiving") == "1",
            ingest=h.get("ingest", ""),
            waiting=h.get("waiting", ""),
        )


def connect(url: str) -> aioredis.Redis:
    """A Redis client for ``redis://``, ``rediss://`` or ``unix://`` URLs, answering str."""
    return aioredis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


async def disconnect(redis: aioredis.Redis) -> None:
    """Close a client from ``connect``; a failure to close is only logged (the connections are gone anyway)."""
    try:
        await redis.aclose()
    except (RedisError, OSError) as exc:
        log.debug("closing the redis client: %s", exc)


T = TypeVar("T")


def _unavailable(exc: RedisError) -> errors.StoreFailed:
    return errors.StoreFailed(f"the job queue (redis) is unavailable: {exc}")


async def despite_outage(what: str, call: Callable[[], Awaitable[T]], retry_for: float, delay: float = 0.5) -> T:
    """``call()`` (a Redis write), retried while Redis is unreachable for up to ``retry_for`` seconds.

    Waits ``delay`` seconds, doubling up to 10 s, between tries; the last RedisError (or OSError)
    is raised once the next try would come after ``retry_for``.
    """
    give_up = time.monotonic() + retry_for
    while True:
        try:
            return await call()
        except (RedisError, OSError) as exc:
            if time.monotonic() + delay >= give_up:
                raise
            log.warning("%s: the job queue (redis) is unavailable (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


class JobStore:
    """Jobs and the work stream; every Redis failure surfaces as StoreFailed."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._prune = redis.register_script(_PRUNE)

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group (from the start of the stream) if missing."""
        try:
            await self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        except RedisError as exc:
            raise _unavailable(exc) from None

    # -------------------------------------------------------------- submitting

    async def submit(
        self,
        job: str,
        *,
        path: str,
        size: int,
        hash_hex: str = "",
        name: str = "",
        ext: str = "",
        content_type: str = "",
        identity: str = "",
        remove: bool = True,
        receiving: bool = False,
        ingest: str = "",
    ) -> None:
        """Record a job and queue it, atomically. ``hash_hex`` may be empty: the worker hashes the file.

        With ``receiving`` the file is still being written by the ingest process ``ingest``:
        ``received`` or ``abort`` follows.
        """
        fields: dict[Any, Any] = {
            "state": ACTIVE,
            "name": name,
            "ext": ext,
            "content_type": content_type,
            "size": str(size),
            "hash": hash_hex,
            "spool": path,
            "remove": "1" if remove else "0",
            "identity": identity,
            "created": f"{time.time():.3f}",
            "progress": "0",
            "attempts": "0",
            "receiving": "1" if receiving else "0",
        }
        if ingest:
            fields["ingest"] = ingest
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(job_key(job), mapping=fields)
                pipe.xadd(STREAM, {"job": job})
                await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from None

    async def received(self, job: str, *, size: int, hash_hex: str) -> None:
        """The upload of a ``receiving`` job is complete: record its final size and hash."""
        fields: dict[Any, Any] = {"receiving": "0", "size": str(size), "hash": hash_hex, "updated": _now()}
        try:
            await self.redis.hset(job_key(job), mapping=fields)
        except RedisError as exc:
            raise _unavailable(exc) from None

    async def abort(self, job: str, reason: str) -> None:
        """The upload of a ``receiving`` job failed: end the job so its worker stops and cleans up."""
        fields: dict[Any, Any] = {"state": ERROR, "error": ABORTED + reason, "receiving": "0", "updated": _now()}
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(job_key(job), mapping=fields)
                pipe.expire(job_key(job), ABORTED_TTL)
                await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from None

    async def tail_state(self, job: str) -> tuple[str, bool, int, str, str] | None:
        """(state, receiving, size, hash, error) of a job whose upload may still arrive; None if gone."""
        raw: Any = await self.redis.hmget(job_key(job), ["state", "receiving", "size", "hash", "error"])
        state, receiving, size, hash_hex, error = raw
        if state is None:
            return None
        return state, receiving == "1", int(size or 0), hash_hex or "", error or ""

    async def receiver(self, job: str) -> str:
        """The ingest process recorded as receiving a streamed job's upload ("" when none)."""
        return str(await self.redis.hget(job_key(job), "ingest") or "")

    # ----------------------------------------------------------------- reading

    async def get(self, job: str) -> Job | None:
        """The job, or None when unknown (or expired)."""
        try:
            h = cast(dict[str, str], await self.redis.hgetall(job_key(job)))
        except RedisError as exc:
            raise _unavailable(exc) from None
        return Job.from_hash(job, h) if h else None

    async def queue_length(self) -> int:
        """Jobs queued or being stored (acknowledged entries are deleted)."""
        try:
            return int(await self.redis.xlen(STREAM))
        except RedisError as exc:
            raise _unavailable(exc) from None

    async def stats(self) -> dict[str, int]:
        """The workers' counters (done, failed, dedup, bytes_stored)."""
        try:
            raw = cast(dict[str, str], await self.redis.hgetall(STATS))
        except RedisError as exc:
            raise _unavailable(exc) from None
        return {k: int(v) for k, v in raw.items()}

    # ------------------------------------------------------------ worker health

    async def report_worker(self, consumer: str, ready: bool, reason: str, ttl: float) -> None:
        """Note whether the worker ``consumer`` can store now; the note lapses after ``ttl`` seconds."""
        value = "1" if ready else f"0 {reason}"
        try:
            await self.redis.set(WORKER_PREFIX + consumer, value, px=max(1, int(ttl * 1000)))
        except RedisError as exc:
            raise _unavailable(exc) from None

    async def forget_worker(self, consumer: str) -> None:
        """Drop the worker's report (it is stopping)."""
        try:
            await self.redis.delete(WORKER_PREFIX + consumer)
        except RedisError as exc:
            raise _unavailable(exc) from None

    async def worker_reports(self, consumers: list[str]) -> dict[str, tuple[bool, str]]:
        """The live reports of these workers: consumer -> (can store, why not)."""
        if not consumers:
            return {}
        try:
            raw = cast(list[str | None], await self.redis.mget([WORKER_PREFIX + c for c in consumers]))
        except RedisError as exc:
            raise _unavailable(exc) from None
        out: dict[str, tuple[bool, str]] = {}
        for consumer, value in zip(consumers, raw, strict=True):
            if value is not None:
                flag, _, reason = value.partition(" ")
                out[consumer] = (flag == "1", reason)
        return out

    # ------------------------------------------------------------------ worker

    async def read(self, consumer: str, block_ms: int) -> list[tuple[str, str]]:
        """New entries for ``consumer``: (entry id, job id), waiting up to ``block_ms``."""
        reply: Any = await self.redis.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=1, block=block_ms)
        out: list[tuple[str, str]] = []
        for _stream, entries in reply or []:
            out += await self._entries(entries)
        return out

    async def read_pending(self, consumer: str, count: int = 100) -> list[tuple[str, str]]:
        """Entries delivered to ``consumer`` and never acknowledged (its predecessor in the slot died)."""
        reply: Any = await self.redis.xreadgroup(GROUP, consumer, {STREAM: "0"}, count=count)
        out: list[tuple[str, str]] = []
        for _stream, entries in reply or []:
            gone = [entry_id for entry_id, fields in entries if not fields]
            if gone:  # pending ids whose entry was deleted: nothing to do but forget them
                await self.redis.xack(STREAM, GROUP, *gone)
            out += await self._entries([e for e in entries if e[1]])
        return out

    async def autoclaim(self, consumer: str, min_idle_ms: int, count: int = 1) -> list[tuple[str, str]]:
        """Take over entries idle for ``min_idle_ms`` (their worker died): (entry id, job id)."""
        reply: Any = await self.redis.xautoclaim(STREAM, GROUP, consumer, min_idle_ms, "0-0", count=count)
        entries = reply[1] if len(reply) > 1 else []
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:  # pending ids whose entry is gone: nothing to do but forget them
            await self.redis.xack(STREAM, GROUP, *deleted)
        return await self._entries(entries)

    async def _entries(self, entries: list[Any]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for entry_id, fields in entries:
            job = (fields or {}).get("job", "")
            if _JOB_ID.match(job):
                out.append((entry_id, job))
            else:
                log.warning("dropping malformed stream entry %s", entry_id)
                await self.ack(entry_id)
        return out

    async def heartbeat(self, consumer: str, entry_id: str) -> bool:
        """Keep a pending entry fresh; False when another consumer has taken it over."""
        return bool(await self._heartbeat(keys=[STREAM], args=[GROUP, consumer, entry_id]))

    async def prune_consumers(self, idle_ms: int) -> int:
        """Forget consumers (dead workers) with nothing pending, idle over ``idle_ms``."""
        return int(await self._prune(keys=[STREAM], args=[GROUP, idle_ms]))

    async def start(self, job: str, worker: str) -> int:
        """Note that ``worker`` (consumer name) starts the job; return the attempt number."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(job_key(job), "attempts", 1)
            pipe.hset(
                job_key(job),
                mapping={"worker": worker, "worker_pid": str(os.getpid()), "progress": "0", "updated": _now()},
            )
            attempts, _ = await pipe.execute()
        return int(attempts)

    async def set_waiting(self, job: str, reason: str | None) -> None:
        """Note why the job waits (an outage), or that it no longer does (None)."""
        if reason is None:
            await self.redis.hdel(job_key(job), "waiting")
        else:
            await self.redis.hset(job_key(job), mapping={"waiting": reason, "updated": _now()})

    async def set_progress(self, job: str, done: int) -> None:
        fields: dict[Any, Any] = {"progress": str(done), "updated": _now()}
        await self.redis.hset(job_key(job), mapping=fields)

    async def done(self, job: str, *, file_id: str, dedup: bool, receipt: bytes, size: int, hash_hex: str = "") -> None:
        """Mark the job DONE, count it and wake Status waiters."""
        fields: dict[Any, Any] = {"state": DONE, "file_id": file_id, "dedup": "1" if dedup else "0"}
        fields |= {"receipt": receipt.hex(), "size": str(size), "progress": str(size), "error": ""}
        fields["updated"] = _now()
        if hash_hex:
            fields["hash"] = hash_hex
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job), mapping=fields)
            pipe.expire(job_key(job), JOB_TTL)
            pipe.hincrby(STATS, "done", 1)
            if dedup:
                pipe.hincrby(STATS, "dedup", 1)
            else:
                pipe.hincrby(STATS, "bytes_stored", size)
            pipe.publish(channel(job), DONE)
            await pipe.execute()

    async def fail(self, job: str, reason: str) -> None:
        """Mark the job ERROR with ``reason``, count it and wake Status waiters."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job), mapping={"state": ERROR, "error": reason, "updated": _now()})
            pipe.expire(job_key(job), JOB_TTL)
            pipe.hincrby(STATS, "failed", 1)
            pipe.publish(channel(job), ERROR)
            await pipe.execute()

    async def ack(self, entry_id: str) -> None:
        """The entry's job has ended: acknowledge and delete it."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(STREAM, GROUP, entry_id)
            pipe.xdel(STREAM, entry_id)
            await pipe.execute()

    async def requeue(self, entry_id: str, job: str) -> None:
        """Put a job back at the end of the queue (its worker is stopping); the attempt does not count."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(STREAM, {"job": job})
            pipe.xack(STREAM, GROUP, entry_id)
            pipe.xdel(STREAM, entry_id)
            pipe.hincrby(job_key(job), "attempts", -1)
            pipe.hset(job_key(job), mapping={"progress": "0", "worker": "", "updated": _now()})
            await pipe.execute()


def _now() -> str:
    return f"{time.time():.3f}"


class Notifier:
    """One pattern subscription per process that wakes local Status waiters when their job ends.

    The subscription is live before any waiter registers, so a waiter that
    registers and then re-reads the job hash cannot miss the notice. While the
    connection is being re-established waiters fall back to re-reading every
    ``recheck`` seconds, and all of them re-read once it is back.
    """

    def __init__(self, redis: aioredis.Redis, recheck: float = 5.0) -> None:
        self.redis = redis
        self.recheck = recheck
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, confirm_within: float = 10.0) -> None:
        """Subscribe; StoreFailed if Redis does not confirm within ``confirm_within`` seconds."""
        self._task = asyncio.create_task(self._run(), name="job-notifier")
        try:
            await asyncio.wait_for(self._ready.wait(), confirm_within)
        except TimeoutError:
            await self.stop()
            raise errors.StoreFailed("the job queue (redis) did not confirm the status subscription") from None

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _run(self) -> None:
        delay = 0.5
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.psubscribe(CHANNEL_PREFIX + "*")
                async for msg in pubsub.listen():
                    kind = msg.get("type")
                    if kind == "psubscribe":
                        self._ready.set()
                        delay = 0.5
                        self._wake_all()  # notices sent while we were away: everyone re-reads
                    elif kind == "pmessage":
                        job = str(msg.get("channel", ""))[len(CHANNEL_PREFIX) :]
                        for ev in self._waiters.get(job, ()):
                            ev.set()
            except RedisError as exc:
                log.warning("status subscription lost (%s); reconnecting in %.1fs", exc, delay)
            finally:
                self._ready.clear()
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                except (RedisError, OSError) as exc:  # the connection is gone already
                    log.debug("closing the status subscription: %s", exc)
            self._wake_all()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for ev in events:
                ev.set()

    @contextlib.asynccontextmanager
    async def watch(self, job: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever a notice for ``job`` arrives (or the subscription was re-made)."""
        ev = asyncio.Event()
        self._waiters.setdefault(job, set()).add(ev)
        try:
            yield ev
        finally:
            events = self._waiters.get(job)
            if events is not None:
                events.discard(ev)
                if not events:
                    del self._waiters[job]

    async def wait(self, store: JobStore, job: str, seconds: float) -> tuple[Job, bool]:
        """The job once it has ended, or as it stands after ``seconds``: (job, timed_out)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        async with self.watch(job) as ev:
            while True:
                ev.clear()  # before the read: a notice arriving after it sets ev again
                current = await store.get(job)
                checkpoint()
                if current is None:
                    raise errors.NotFound(f"no job {job} (unknown, or finished more than {JOB_TTL // 86400} days ago)")
                remaining = deadline - loop.time()
                if current.finished:
                    return current, False
                if remaining <= 0:
                    return current, True
                # A lost notice cannot happen while subscribed; re-read now and then all the same.
                step = min(remaining, self.recheck if not self._ready.is_set() else 12 * self.recheck)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), step)
