"""ZdbBackend and ensure_namespace against a real 0-db (skipped without one; see tests/zdb_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from services.common import errors
from services.common.backends.base import MAX_VALUE_SIZE, Mode, seq_id, seq_key
from services.common.backends.uri import ZdbURI
from services.common.backends.zdb import (
    NamespaceModeMismatch,
    NamespaceNotFound,
    ZdbBackend,
    ensure_namespace,
)
from tests.zdb_server import ZdbProcess

pytestmark = pytest.mark.zdb

SECRET = "s3cr3t-Pa55"  # a namespace password that must never leak
ADMIN = "adm1n-Pa55"

Opener = Callable[..., Awaitable[ZdbBackend]]


@pytest.fixture
async def opener() -> AsyncIterator[Opener]:
    """``await opener(zdb, ns, mode, password=None, create=True, **ensure_kwargs)``; closes every backend after."""
    opened: list[ZdbBackend] = []

    async def _open(
        zdb: ZdbProcess,
        namespace: str,
        mode: Mode,
        *,
        password: str | None = None,
        create: bool = True,
        **ensure_kwargs: Any,
    ) -> ZdbBackend:
        if create:
            await ensure_namespace(
                zdb.host, zdb.port, namespace, mode=mode, password=password, admin_password=zdb.admin, **ensure_kwargs
            )
        backend = await ZdbBackend.open(zdb.uri(namespace, password), mode, timeout=2.0)
        opened.append(backend)
        return backend

    yield _open
    for backend in opened:
        await backend.close()


def nsinfo(zdb: ZdbProcess, namespace: str) -> dict[str, str]:
    text = zdb.command("NSINFO", namespace).decode()
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


async def collect(it: AsyncIterator[bytes]) -> list[bytes]:
    return [key async for key in it]


def assert_no_secret(*objs: object) -> None:
    for obj in objs:
        assert SECRET not in str(obj)
        assert SECRET not in repr(obj)


# -- namespaces ----------------------------------------------------------------


async def test_ensure_namespace_creates_and_is_idempotent(zdb_server: ZdbProcess) -> None:
    for _ in range(2):
        await ensure_namespace(zdb_server.host, zdb_server.port, "shards", mode=Mode.SEQ, maxsize=10_000_000)
        await ensure_namespace(zdb_server.host, zdb_server.port, "index", mode=Mode.USER)
    assert {b"shards", b"index"} <= set(zdb_server.command("NSLIST"))
    shards = nsinfo(zdb_server, "shards")
    assert shards["mode"] == "sequential"
    assert shards["data_limits_bytes"] == "10000000"
    assert nsinfo(zdb_server, "index")["mode"] == "userkey"


async def test_ensure_namespace_sets_password_and_public(zdb_server: ZdbProcess) -> None:
    await ensure_namespace(zdb_server.host, zdb_server.port, "priv", mode=Mode.SEQ, password=SECRET, public=False)
    info = nsinfo(zdb_server, "priv")
    assert (info["password"], info["public"]) == ("yes", "no")
    # Running it again without a password leaves the password alone.
    await ensure_namespace(zdb_server.host, zdb_server.port, "priv", mode=Mode.SEQ)
    assert nsinfo(zdb_server, "priv")["password"] == "yes"


async def test_ensure_namespace_needs_admin(zdb_factory: Callable[..., ZdbProcess]) -> None:
    zdb = zdb_factory(admin=ADMIN)
    with pytest.raises(errors.AccessDenied, match="admin") as no_admin:
        await ensure_namespace(zdb.host, zdb.port, "ns", mode=Mode.SEQ)
    with pytest.raises(errors.AccessDenied, match="wrong 0-db admin password") as wrong:
        await ensure_namespace(zdb.host, zdb.port, "ns", mode=Mode.SEQ, admin_password="nope")
    await ensure_namespace(zdb.host, zdb.port, "ns", mode=Mode.SEQ, admin_password=ADMIN, password=SECRET)
    await ensure_namespace(zdb.host, zdb.port, "ns", mode=Mode.SEQ, admin_password=ADMIN, password=SECRET)
    assert nsinfo(zdb, "ns")["mode"] == "sequential"
    assert_no_secret(no_admin.value, wrong.value)
    assert ADMIN not in str(wrong.value)


async def test_ensure_namespace_refuses_mode_change_of_used_namespace(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "used", Mode.USER)
    await backend.set(b"k", b"v")
    with pytest.raises(NamespaceModeMismatch, match="userkey"):
        await ensure_namespace(zdb_server.host, zdb_server.port, "used", mode=Mode.SEQ)
    # An empty namespace can still switch.
    await ensure_namespace(zdb_server.host, zdb_server.port, "fresh", mode=Mode.USER)
    await ensure_namespace(zdb_server.host, zdb_server.port, "fresh", mode=Mode.SEQ)
    assert nsinfo(zdb_server, "fresh")["mode"] == "sequential"


async def test_ensure_namespace_on_single_mode_server(zdb_factory: Callable[..., ZdbProcess]) -> None:
    zdb = zdb_factory(mode="seq")
    await ensure_namespace(zdb.host, zdb.port, "ok", mode=Mode.SEQ)
    with pytest.raises(NamespaceModeMismatch, match="single runtime mode"):
        await ensure_namespace(zdb.host, zdb.port, "nope", mode=Mode.USER)


async def test_open_wrong_mode_and_missing_namespace(zdb_server: ZdbProcess, opener: Opener) -> None:
    await ensure_namespace(zdb_server.host, zdb_server.port, "userns", mode=Mode.USER)
    with pytest.raises(NamespaceModeMismatch, match="userkey mode") as exc:
        await ZdbBackend.open(zdb_server.uri("userns"), Mode.SEQ)
    assert isinstance(exc.value, errors.BackendError)
    with pytest.raises(NamespaceNotFound, match=f"namespace ghost not found on 127.0.0.1:{zdb_server.port}") as missing:
        await ZdbBackend.open(zdb_server.uri("ghost", SECRET), Mode.SEQ)
    assert isinstance(missing.value, errors.BackendUnavailable)
    assert_no_secret(missing.value)


# -- data ------------------------------------------------------------------------


async def test_sequential_ids(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "seq", Mode.SEQ)
    keys = [await backend.put(b"value %d" % i) for i in range(3)]
    assert all(len(k) == 8 for k in keys)
    assert [seq_id(k) for k in keys] == [0, 1, 2]
    assert keys == [seq_key(i) for i in range(3)]  # little-endian
    await backend.set(keys[1], b"updated")
    await backend.delete(keys[2])
    after = await backend.put(b"next")
    # Not dense: the update and the delete used up internal ids.
    assert seq_id(after) > seq_id(keys[2]) + 1
    assert await backend.get(after) == b"next"


async def test_seq_put_get_exists_delete_update(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "seq", Mode.SEQ)
    key = await backend.put(b"hello")
    assert await backend.get(key) == b"hello"
    assert await backend.exists(key)
    await backend.set(key, b"world")
    assert await backend.get(key) == b"world"
    await backend.set(key, b"world")  # same data: 0-db answers nil, still a success
    assert await backend.get(key) == b"world"
    await backend.delete(key)
    assert await backend.get(key) is None
    assert not await backend.exists(key)
    with pytest.raises(errors.KeyNotFound):
        await backend.delete(key)
    with pytest.raises(errors.KeyNotFound):
        await backend.set(key, b"again")  # deleted ids cannot come back
    with pytest.raises(errors.KeyNotFound):
        await backend.set(seq_key(999), b"x")  # never allocated
    with pytest.raises(errors.KeyNotFound):
        await backend.set(b"abcd", b"x")  # not a sequential key at all
    assert await backend.get(seq_key(999)) is None
    assert await backend.get(b"abcd") is None
    empty = await backend.put(b"")
    assert await backend.get(empty) == b""


async def test_user_put_get_exists_delete_update(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "usr", Mode.USER)
    with pytest.raises(errors.InvalidInput):
        await backend.put(b"no keys allocated in user mode")
    await backend.set(b"k1", b"one")
    await backend.set(b"k1", b"one")  # same data
    await backend.set(b"k1", b"uno")
    assert await backend.get(b"k1") == b"uno"
    assert await backend.exists(b"k1")
    assert not await backend.exists(b"k2")
    assert await backend.get(b"k2") is None
    await backend.delete(b"k1")
    with pytest.raises(errors.KeyNotFound):
        await backend.delete(b"k1")
    big_key = b"k" * 255
    await backend.set(big_key, b"v")
    assert await backend.get(big_key) == b"v"
    for bad in (b"", b"k" * 256):
        with pytest.raises(errors.InvalidInput):
            await backend.set(bad, b"v")
        with pytest.raises(errors.InvalidInput):
            await backend.get(bad)


async def test_value_size_limit(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "big", Mode.SEQ)
    with pytest.raises(errors.ValueTooLarge) as exc:
        await backend.put(b"x" * (MAX_VALUE_SIZE + 1))
    assert backend.name in str(exc.value)
    key = await backend.put(b"y" * MAX_VALUE_SIZE)  # exactly 8 MiB is allowed
    with pytest.raises(errors.ValueTooLarge):
        await backend.set(key, b"z" * (MAX_VALUE_SIZE + 1))
    # Nothing was sent, so the connection (and its SELECT) is intact.
    assert await backend.get(key) == b"y" * MAX_VALUE_SIZE
    assert await backend.put(b"small")


async def test_scan_order_and_resume_seq(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "scan", Mode.SEQ)
    assert await collect(backend.scan()) == []
    keys = [await backend.put(b"v%d" % i) for i in range(6)]
    assert await collect(backend.scan()) == keys
    assert await collect(backend.scan(after=keys[2])) == keys[3:]
    assert await collect(backend.scan(after=keys[-1])) == []
    await backend.set(keys[0], b"updated")  # an update keeps the id's place
    await backend.delete(keys[3])
    remaining = [k for k in keys if k != keys[3]]
    assert await collect(backend.scan()) == remaining
    # Resume after a key deleted meanwhile: continue with the next ids.
    assert await collect(backend.scan(after=keys[3])) == keys[4:]


async def test_scan_order_and_resume_user(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "uscan", Mode.USER)
    for key in (b"a", b"b", b"c", b"d"):
        await backend.set(key, key)
    assert await collect(backend.scan()) == [b"a", b"b", b"c", b"d"]
    await backend.set(b"a", b"rewritten")  # user mode: last-write order
    await backend.delete(b"c")
    assert await collect(backend.scan()) == [b"b", b"d", b"a"]
    assert await collect(backend.scan(after=b"b")) == [b"d", b"a"]
    with pytest.raises(errors.KeyNotFound):
        await collect(backend.scan(after=b"c"))


async def test_many_connections_stay_on_namespace(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "busy", Mode.SEQ)
    keys = await asyncio.gather(*(backend.put(b"v%d" % i) for i in range(64)))
    assert len(set(keys)) == 64
    values = await asyncio.gather(*(backend.get(k) for k in keys))
    assert values == [b"v%d" % i for i in range(64)]
    assert zdb_server.command("DBSIZE") == 0  # nothing leaked into default


async def test_info(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "inf", Mode.SEQ, maxsize=1000)
    info = await backend.info()
    assert (info.entries, info.used_bytes, info.free_bytes) == (0, 0, 1000)
    await backend.put(b"x" * 100)
    await backend.put(b"y" * 50)
    info = await backend.info()
    assert (info.entries, info.used_bytes, info.free_bytes) == (2, 150, 850)
    unlimited = await opener(zdb_server, "unl", Mode.USER)
    free = (await unlimited.info()).free_bytes
    assert free is not None and free > 0  # the data disk's free space


# -- failures --------------------------------------------------------------------


async def test_reconnect_after_restart_keeps_namespace(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "persist", Mode.SEQ, password=SECRET)
    first = await backend.put(b"before restart")
    zdb_server.restart()
    # Same pool, new TCP connection: it must SELECT "persist" (with its password) again.
    assert await backend.get(first) == b"before restart"
    second = await backend.put(b"after restart")
    assert seq_id(second) > seq_id(first)
    zdb_server.restart()
    assert await backend.exists(second)
    assert zdb_server.command("DBSIZE") == 0  # default namespace untouched
    assert nsinfo(zdb_server, "persist")["entries"] == "2"


async def test_unavailable_when_killed(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "doomed", Mode.SEQ, password=SECRET)
    key = await backend.put(b"v")
    zdb_server.kill()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: backend.get(key),
        lambda: backend.put(b"v"),
        backend.info,
        lambda: collect(backend.scan()),
    ]
    for call in calls:
        with pytest.raises(errors.BackendUnavailable) as exc:
            await call()
        message = str(exc.value)
        assert message.startswith(f"zdb://:***@127.0.0.1:{zdb_server.port}/doomed: ")
        assert exc.value.backend == backend.name
        assert_no_secret(exc.value)
    # Nothing listening at all: open() fails the same way.
    with pytest.raises(errors.BackendUnavailable, match=r"zdb://:\*\*\*@127\.0\.0\.1"):
        await ZdbBackend.open(zdb_server.uri("doomed", SECRET), Mode.SEQ, timeout=1.0)
    # And recovers when the server is back.
    zdb_server.start()
    assert await backend.get(key) == b"v"


async def test_hung_server_times_out(zdb_server: ZdbProcess) -> None:
    await ensure_namespace(zdb_server.host, zdb_server.port, "slow", mode=Mode.USER)
    backend = await ZdbBackend.open(zdb_server.uri("slow"), Mode.USER, timeout=0.3)
    try:
        await backend.set(b"k", b"v")
        zdb_server.pause()
        try:
            with pytest.raises(errors.BackendUnavailable, match=backend.name):
                await backend.get(b"k")
        finally:
            zdb_server.resume()
        assert await backend.get(b"k") == b"v"  # the timed-out connection was dropped, not reused
    finally:
        await backend.close()


async def test_namespace_removed_while_open(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "gone", Mode.USER)
    await backend.set(b"k", b"v")
    zdb_server.command("NSDEL", "gone")
    # The server drops our connection; the reconnect must not land in "default".
    for attempt in range(3):  # 0-db says so on the old connection first, then refuses the re-SELECT
        with pytest.raises(NamespaceNotFound, match="namespace gone") as exc:
            await backend.set(b"k%d" % attempt, b"v")
        assert "namespace gone" in str(exc.value)
    assert zdb_server.command("DBSIZE") == 0


async def test_namespace_full(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "tiny", Mode.SEQ, maxsize=100)
    key = await backend.put(b"x" * 60)
    with pytest.raises(errors.NamespaceFull) as exc:
        await backend.put(b"x" * 60)
    assert str(exc.value).startswith(backend.name)
    await backend.set(key, b"y" * 40)  # overwrites give space back
    await backend.put(b"z" * 50)


async def test_locked_and_frozen_are_read_only(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "lk", Mode.SEQ)
    key = await backend.put(b"v")
    zdb_server.command("NSSET", "lk", "lock", "1")
    with pytest.raises(errors.ReadOnly):
        await backend.put(b"w")
    with pytest.raises(errors.ReadOnly):
        await backend.delete(key)
    assert await backend.get(key) == b"v"
    zdb_server.command("NSSET", "lk", "lock", "0")
    zdb_server.command("NSSET", "lk", "freeze", "1")
    with pytest.raises(errors.ReadOnly):
        await backend.put(b"w")
    zdb_server.command("NSSET", "lk", "freeze", "0")
    assert await backend.put(b"w")


async def test_password_protected_namespace(zdb_factory: Callable[..., ZdbProcess], opener: Opener) -> None:
    zdb = zdb_factory(admin=ADMIN)
    writer = await opener(zdb, "pub", Mode.SEQ, password=SECRET)  # public (0-db's default)
    key = await writer.put(b"shared")
    assert_no_secret(writer)

    # Wrong password: refused at open().
    with pytest.raises(errors.AccessDenied) as wrong:
        await ZdbBackend.open(zdb.uri("pub", "not-" + SECRET), Mode.SEQ)
    assert "not-" not in str(wrong.value)
    assert_no_secret(wrong.value)

    # Public namespace without the password: reads work, writes are refused.
    reader = await opener(zdb, "pub", Mode.SEQ, create=False)
    assert await reader.get(key) == b"shared"
    assert [k async for k in reader.scan()] == [key]
    with pytest.raises(errors.ReadOnly):
        await reader.put(b"nope")
    with pytest.raises(errors.ReadOnly):
        await reader.delete(key)

    # Private namespace: nothing without the password.
    await ensure_namespace(
        zdb.host, zdb.port, "priv", mode=Mode.SEQ, password=SECRET, public=False, admin_password=ADMIN
    )
    with pytest.raises(errors.AccessDenied) as private:
        await ZdbBackend.open(zdb.uri("priv"), Mode.SEQ)
    assert_no_secret(private.value)
    owner = await opener(zdb, "priv", Mode.SEQ, password=SECRET, create=False)
    assert await owner.get(await owner.put(b"mine")) == b"mine"


async def test_password_never_leaks(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "leak", Mode.USER, password=SECRET)
    seen: list[BaseException] = []
    for bad in (
        backend.delete(b"missing"),
        backend.put(b"v"),
        backend.set(b"k", b"x" * (MAX_VALUE_SIZE + 1)),
    ):
        with pytest.raises(errors.GridstorError) as exc:
            await bad
        seen.append(exc.value)
    assert_no_secret(backend, *seen, backend._client, backend._client.connection_pool)
    assert repr(backend) == f"<ZdbBackend zdb://:***@127.0.0.1:{zdb_server.port}/leak user>"
    assert backend.uri == ZdbURI("127.0.0.1", zdb_server.port, "leak", SECRET)


async def test_closed_backend_is_unusable(zdb_server: ZdbProcess, opener: Opener) -> None:
    backend = await opener(zdb_server, "cl", Mode.SEQ)
    await backend.close()
    await backend.close()  # idempotent
    with pytest.raises(errors.BackendUnavailable, match="closed"):
        await backend.put(b"v")


async def test_hung_server_never_keeps_a_pool_slot(zdb_server: ZdbProcess) -> None:
    """A stopped 0-db accepts connections and never answers: every call ends within the timeout, and the
    pool's slots come back, so more calls than slots neither hang nor fail once it answers again."""
    await ensure_namespace(zdb_server.host, zdb_server.port, "hung", mode=Mode.SEQ)
    backend = await ZdbBackend.open(zdb_server.uri("hung"), Mode.SEQ, timeout=0.5, max_connections=2)
    try:
        key = await backend.put(b"v")
        zdb_server.pause()
        try:
            results = await asyncio.gather(*(backend.get(key) for _ in range(6)), return_exceptions=True)
        finally:
            zdb_server.resume()
        assert all(isinstance(r, errors.BackendUnavailable) for r in results), results
        assert await asyncio.gather(*(backend.get(key) for _ in range(6))) == [b"v"] * 6
    finally:
        await backend.close()


async def test_identity_marker_written_adopted_and_replaced(zdb_server: ZdbProcess) -> None:
    """A shard namespace gets a marker as its first value; a wipe and re-provisioning is noticed on the next call."""
    await ensure_namespace(zdb_server.host, zdb_server.port, "shards", mode=Mode.SEQ)
    first = await ZdbBackend.open(zdb_server.uri("shards"), Mode.SEQ, timeout=2.0, marked=True)
    second = await ZdbBackend.open(zdb_server.uri("shards"), Mode.SEQ, timeout=2.0, marked=True)
    plain = await ZdbBackend.open(zdb_server.uri("shards"), Mode.SEQ, timeout=2.0)
    try:
        assert len(first.identity) == 16 and second.identity == first.identity and plain.identity == b""
        assert first.marker_key == seq_key(0) and nsinfo(zdb_server, "shards")["entries"] == "1"
        shard = await first.put(b"x" * 100)
        assert await first.length(shard) == 100 and await first.length(seq_key(99)) is None
        assert await first.high_water() == seq_id(shard) + 1
        old = first.identity

        zdb_server.command("NSDEL", "shards")  # the disk is replaced: a new, empty namespace of the same name
        await ensure_namespace(zdb_server.host, zdb_server.port, "shards", mode=Mode.SEQ)
        # The open backend reconnects, finds another value under its marker key (nothing there) and sets the
        # new namespace up with a new marker before anything else runs on it.
        with contextlib.suppress(errors.BackendError):  # 0-db tells the old connection first
            await first.length(shard)
        assert await first.length(shard) is None
        assert first.identity not in (b"", old) and first.marker_key == seq_key(0)
        with contextlib.suppress(errors.BackendError):  # its old connection hears of the removal first
            await second.get(seq_key(0))
        await second.get(seq_key(0))  # another process adopts the same new identity
        assert second.identity == first.identity
        again = await first.put(b"y")
        assert seq_id(again) >= 1  # the marker stays the first value
    finally:
        for b in (first, second, plain):
            await b.close()


async def test_identity_of_a_namespace_filled_before_markers(zdb_server: ZdbProcess, opener: Opener) -> None:
    old = await opener(zdb_server, "legacy", Mode.SEQ)
    await old.put(b"an old shard")
    marked = await ZdbBackend.open(zdb_server.uri("legacy"), Mode.SEQ, timeout=2.0, marked=True)
    try:
        assert marked.identity == b"" and marked.marker_key is None  # unknown: only shard sizes tell a wipe
        assert nsinfo(zdb_server, "legacy")["entries"] == "1"  # nothing written into it
    finally:
        await marked.close()


async def test_empty_namespace_opened_by_two_at_once_gets_one_identity(zdb_server: ZdbProcess) -> None:
    await ensure_namespace(zdb_server.host, zdb_server.port, "race", mode=Mode.SEQ)
    opened = await asyncio.gather(
        *(ZdbBackend.open(zdb_server.uri("race"), Mode.SEQ, timeout=2.0, marked=True) for _ in range(4))
    )
    try:
        assert len({b.identity for b in opened}) == 1 and opened[0].identity
        assert nsinfo(zdb_server, "race")["entries"] == "1"  # the losers' markers were deleted
    finally:
        for b in opened:
            await b.close()
