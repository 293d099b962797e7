"""The pipelined 0-db data path (services/common/backends/zdbwire.py) against a real zdb."""

from __future__ import annotations

import asyncio
import os

import pytest
from redis import exceptions as rexc

from services.common import errors
from services.common.backends.base import MAX_VALUE_SIZE, Mode, seq_key
from services.common.backends.zdb import ZdbBackend, ensure_namespace
from services.common.backends.zdbwire import LINE_BUFFER, MAX_BULK, MAX_LINE, WireConnection, WirePool
from tests.helpers import wait_until_async
from tests.zdb_server import ZdbProcess

pytestmark = pytest.mark.zdb


async def open_backend(zdb: ZdbProcess, ns: str, *, wire: int = 1, timeout: float = 2.0) -> ZdbBackend:  # noqa: ASYNC109
    await ensure_namespace(zdb.host, zdb.port, ns, mode=Mode.SEQ)
    return await ZdbBackend.open(zdb.uri(ns), Mode.SEQ, timeout=timeout, marked=True, wire_connections=wire)


def pool_of(backend: ZdbBackend) -> WirePool:
    assert backend._wire is not None
    return backend._wire


async def test_many_requests_pipeline_on_one_connection_in_order(zdb_server: ZdbProcess) -> None:
    """200 concurrent puts then gets share one connection; every reply reaches its own request."""
    backend = await open_backend(zdb_server, "pipe", wire=1)
    try:
        values = [os.urandom(1 + (i * 7919) % 300_000) for i in range(200)]
        keys = await asyncio.gather(*(backend.put(v) for v in values))
        assert len(set(keys)) == 200
        assert len(pool_of(backend).conns) == 1
        got = await asyncio.gather(*(backend.get(k) for k in keys))
        assert got == values
        assert len(pool_of(backend).conns) == 1
        assert await backend.get(seq_key(10**6)) is None  # nil between bulk replies
    finally:
        await backend.close()


async def test_payloads_of_every_size_are_read_whole(zdb_server: ZdbProcess) -> None:
    """Values around the line buffer's size and up to 0-db's limit, pipelined with empty and tiny ones."""
    backend = await open_backend(zdb_server, "sizes", wire=1)
    try:
        sizes = [0, 1, LINE_BUFFER - 3, LINE_BUFFER - 2, LINE_BUFFER, LINE_BUFFER + 1, 3 * 1024 * 1024, MAX_VALUE_SIZE]
        values = [os.urandom(n) for n in sizes]
        keys = await asyncio.gather(*(backend.put(v) for v in values))
        for _ in range(2):
            got = await asyncio.gather(*(backend.get(k) for k in reversed(keys)))
            assert got == values[::-1]
    finally:
        await backend.close()


async def test_a_cancelled_request_leaves_the_connection_in_step(zdb_server: ZdbProcess) -> None:
    backend = await open_backend(zdb_server, "cancel", wire=1)
    try:
        big = os.urandom(4 * 1024 * 1024)
        big_key, small_key = await backend.put(big), await backend.put(b"small")
        for _ in range(5):
            task = asyncio.create_task(backend.get(big_key))
            await asyncio.sleep(0)  # sent, its reply not read yet
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The next reply on the same connection is its own, not the cancelled one's.
            assert await backend.get(small_key) == b"small"
        assert len(pool_of(backend).conns) == 1
    finally:
        await backend.close()


async def test_connections_grow_to_the_pool_size_under_load(zdb_server: ZdbProcess) -> None:
    backend = await open_backend(zdb_server, "grow", wire=3)
    try:
        key = await backend.put(os.urandom(512 * 1024))
        await asyncio.gather(*(backend.get(key) for _ in range(60)))
        assert 1 <= len(pool_of(backend).conns) <= 3
    finally:
        await backend.close()


async def test_idle_data_connection_after_the_namespace_was_replaced(zdb_server: ZdbProcess) -> None:
    """A put on a data connection whose namespace was deleted and set up again lands in the new one."""
    backend = await open_backend(zdb_server, "swap")
    try:
        await backend.put(b"old")
        old = backend.identity
        zdb_server.command("NSDEL", "swap")
        await ensure_namespace(zdb_server.host, zdb_server.port, "swap", mode=Mode.SEQ)
        key = await backend.put(b"new")  # the command that heard of the removal did not run: once more
        assert backend.identity not in (b"", old)
        assert await backend.get(key) == b"new"

        zdb_server.command("NSDEL", "swap")  # gone for good: said so, never written to "default"
        with pytest.raises(errors.BackendUnavailable, match="swap"):
            await backend.put(b"lost")
        assert zdb_server.command("DBSIZE") == 0
    finally:
        await backend.close()


async def test_without_the_data_path_every_command_goes_through_redis_py(zdb_server: ZdbProcess) -> None:
    backend = await open_backend(zdb_server, "plain", wire=0)
    try:
        assert backend._wire is None
        key = await backend.put(b"v" * 1000)
        assert await backend.get(key) == b"v" * 1000
    finally:
        await backend.close()


async def test_a_restarted_server_gets_new_connections(zdb_server: ZdbProcess) -> None:
    backend = await open_backend(zdb_server, "again", wire=2)
    try:
        key = await backend.put(b"kept")
        zdb_server.kill()
        zdb_server.start()

        async def readable() -> bool:
            try:
                return await backend.get(key) == b"kept"
            except errors.BackendUnavailable:
                return False

        await wait_until_async(readable, "the restarted zdb to serve the key again")
        assert zdb_server.command("DBSIZE") == 0  # every new connection SELECTed the namespace
    finally:
        await backend.close()


def feed(conn: WireConnection, data: bytes) -> None:
    """Hand ``data`` to the protocol as the event loop would, in the pieces its buffers take."""
    while data:
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        del buf  # released before the next get_buffer, as asyncio's transport does
        conn.buffer_updated(n)
        data = data[n:]


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        (b"$%d\r\n" % (MAX_BULK + 1), "over 0-db's"),  # failed before a buffer of that size is made
        (b"+" + b"x" * (MAX_LINE + 2), "reply line over"),  # no CRLF: the line buffer stops growing
    ],
)
async def test_a_reply_no_0db_sends_fails_the_connection_not_the_memory(reply: bytes, needle: str) -> None:
    """Pure protocol logic: whatever answers at a backend's address, one connection holds at most a
    value of 0-db's limit or a line of MAX_LINE."""
    conn = WireConnection()
    waiter: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    conn.waiters.append(waiter)
    feed(conn, reply)
    assert waiter.done()
    with pytest.raises(rexc.ConnectionError, match=needle):
        await waiter
    assert conn.closed and len(conn._lines) <= 4 * MAX_LINE
