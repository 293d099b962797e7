"""The server protects itself: READ cap and paced replies (memory stays bounded), handles and sessions per
connection, connections that never log in, NUL bytes, and no server paths in what clients are told."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from services.ssh.server import MAX_SESSIONS
from services.ssh.sftp import MAX_HANDLES, MAX_READ, REPLY_BUFFER
from tests.helpers import wait_until_async
from tests.ssh.conftest import SshEnv, SshFactory

KiB = 1024
MiB = 1024 * KiB
CLIENT_WINDOW = 2 * MiB  # asyncssh's default receive window: what the server can send before it must buffer


@pytest.fixture
async def env(ssh_factory: SshFactory) -> SshEnv:
    env = await ssh_factory()
    await env.enable("alice", mb=64)
    return env


def rss() -> int:
    """This process's resident memory (the ssh service under test runs in it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no VmRSS in /proc/self/status")


def packet(kind: int, *parts: bytes) -> bytes:
    """One SFTP packet: length, type, body."""
    body = bytes([kind]) + b"".join(parts)
    return len(body).to_bytes(4, "big") + body


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def string(b: bytes) -> bytes:
    return u32(len(b)) + b


class Sink(asyncssh.SSHClientSession[bytes]):
    """A raw client session: what the server sends, collected."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.buf += data
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.arrived.set()

    async def take(self, n: int) -> bytes:
        """The next ``n`` bytes the server sent."""
        while len(self.buf) < n:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 30)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


async def test_pipelined_huge_reads_keep_memory_bounded(env: SshEnv) -> None:
    """40 pipelined READs of 0xFFFFFFFF bytes of a 16 MiB file, the answers left unread (raw SFTP packets)."""
    (env.home("alice") / "big.bin").write_bytes(bytes(range(256)) * (16 * MiB // 256))
    metrics = env.svc.gateway.metrics
    async with env.client() as conn:
        chan, sink = await conn.create_session(Sink, subsystem="sftp", encoding=None)
        chan.write(packet(1, u32(3)))  # INIT, version 3
        length = int.from_bytes(await sink.take(4), "big")
        await sink.take(length)
        chan.write(packet(3, u32(1), string(b"big.bin"), u32(1), u32(0)))  # OPEN for reading
        length = int.from_bytes(await sink.take(4), "big")
        handle = (await sink.take(length))[9:]  # type, id, string length
        chan.pause_reading()  # from here on the client reads nothing: replies pile up unless the server stops
        before, read_before = rss(), metrics.bytes_read.value()
        for i in range(40):
            chan.write(packet(5, u32(10 + i), string(handle), bytes(8), b"\xff\xff\xff\xff"))
        await wait_until_async(
            lambda: metrics.bytes_read.value() - read_before,
            "the server to answer reads",
            until=lambda n: n >= REPLY_BUFFER,
        )
        for _ in range(200):  # loop turns, not time: an unbounded server answers all 40 (640 MiB) meanwhile
            await asyncio.sleep(0)
        answered = metrics.bytes_read.value() - read_before
        grown = rss() - before
        print(f"\n  40 pipelined 4 GiB reads: {answered / MiB:.1f} MiB answered, memory +{grown / MiB:.1f} MiB")
        assert answered <= CLIENT_WINDOW + REPLY_BUFFER + 2 * MAX_READ, answered
        assert grown < 48 * MiB, grown
        chan.resume_reading()
        length = int.from_bytes(await sink.take(4), "big")
        reply = await sink.take(length)
        assert reply[0] == 103 and int.from_bytes(reply[5:9], "big") == MAX_READ  # DATA of 256 KiB, not 16 MiB
        chan.close()


async def test_open_handles_per_session_are_capped(env: SshEnv) -> None:
    (env.home("alice") / "f.txt").write_text("f")
    async with env.client() as conn, conn.start_sftp_client() as sftp:
        files = [await sftp.open("f.txt") for _ in range(MAX_HANDLES)]
        with pytest.raises(asyncssh.SFTPFailure, match=f"at most {MAX_HANDLES}"):
            await sftp.open("f.txt")
        with pytest.raises(asyncssh.SFTPFailure, match=f"at most {MAX_HANDLES}"):
            await sftp.listdir(".")
        await files.pop().close()
        await (await sftp.open("f.txt")).close()
        for f in files:
            await f.close()


async def test_sessions_per_connection_are_capped(env: SshEnv) -> None:
    async with env.client() as conn:
        clients: list[Any] = [await conn.start_sftp_client() for _ in range(MAX_SESSIONS)]
        with pytest.raises(asyncssh.ChannelOpenError, match="Session refused"):
            await conn.start_sftp_client()
        with pytest.raises(asyncssh.ChannelOpenError, match="Session refused"):
            await conn.run("rsync --server . x")
        clients.pop().exit()
        await wait_until_async(lambda: _sessions(env) < MAX_SESSIONS, "a session to close")
        again = await conn.start_sftp_client()
        assert await again.realpath(".") == "/"
        for c in [*clients, again]:
            c.exit()


def _sessions(env: SshEnv) -> int:
    conns = env.svc.gateway.connections.get("alice", set())
    return sum(c.get_owner().sessions for c in conns)  # type: ignore[union-attr]


async def _open(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _closed(reader: asyncio.StreamReader, within: float = 10) -> bool:
    """Whether the server closes this connection (within ``within`` seconds) after at most its banner."""
    try:
        while await asyncio.wait_for(reader.read(4096), within):
            pass
        return True
    except (TimeoutError, ConnectionError):
        return False


async def test_connections_that_do_not_log_in_are_capped_and_timed_out(ssh_factory: SshFactory) -> None:
    env = await ssh_factory(ssh={"max_unauthenticated_per_address": 3, "max_unauthenticated": 4, "login_timeout": 60})
    gw = env.svc.gateway
    held = [await _open(env.port) for _ in range(3)]
    for reader, _ in held:
        assert (await reader.readline()).startswith(b"SSH-2.0-")  # the banner: these wait for a login
    await wait_until_async(lambda: gw.pending["127.0.0.1"], "3 connections counted", until=lambda n: n == 3)
    reader, writer = await _open(env.port)  # a 4th from the same address: closed at once
    assert await _closed(reader)
    writer.close()
    other = await _open(env.port, "127.0.0.2")  # another address: room for one more in all
    assert (await other[0].readline()).startswith(b"SSH-2.0-")
    reader, writer = await _open(env.port, "127.0.0.3")  # 5 in all: closed at once
    assert await _closed(reader)
    writer.close()
    for _, w in [*held, other]:
        w.close()
    await wait_until_async(lambda: sum(gw.pending.values()), "the connections to be uncounted", until=lambda n: n == 0)
    reader, writer = await _open(env.port)
    assert (await reader.readline()).startswith(b"SSH-2.0-")
    writer.close()


async def test_login_timeout(ssh_factory: SshFactory) -> None:
    env = await ssh_factory(ssh={"login_timeout": 1})
    reader, writer = await _open(env.port)
    assert (await reader.readline()).startswith(b"SSH-2.0-")
    assert await _closed(reader, within=30)  # closed by the server after its login timeout
    writer.close()
    await wait_until_async(
        lambda: sum(env.svc.gateway.pending.values()), "the connection uncounted", until=lambda n: n == 0
    )


async def test_nul_in_a_path_or_command_is_a_clean_error(env: SshEnv) -> None:
    async with env.client() as conn:
        async with conn.start_sftp_client() as sftp:
            for call in (sftp.stat, sftp.remove, sftp.mkdir, sftp.listdir):
                with pytest.raises(asyncssh.SFTPError) as caught:
                    await call(b"a\0b")
                assert "NUL byte" in caught.value.reason and "Uncaught" not in caught.value.reason, caught.value
            with pytest.raises(asyncssh.SFTPError, match="NUL byte"):
                await sftp.open(b"x\0y", "wb")
            assert await sftp.realpath(".") == "/"  # the session goes on
        res = await conn.run("rsync --server\0 . x", encoding=None)
        assert res.exit_status == 1 and b"control characters" in res.stderr, res
        scp = await conn.run("scp -f a\0b", input=b"\0", encoding=None)  # the sink's "ready", then the error
        assert b"the path holds a NUL byte" in scp.stdout and b"Uncaught" not in scp.stdout, scp
    assert not list(env.home("alice").iterdir())


async def test_messages_never_show_server_paths(env: SshEnv, tmp_path: Path) -> None:
    src = tmp_path / "x.txt"
    src.write_text("x")
    (env.home("alice") / "file.txt").write_text("f")
    homes_dir = str(env.svc.settings.homes_dir)
    said = [
        await env.scp("alice@127.0.0.1:missing.txt", str(tmp_path / "got"), legacy=True),
        await env.scp(str(src), "alice@127.0.0.1:no/such/dir/x.txt", legacy=True),
        await env.scp("-r", "alice@127.0.0.1:missing-dir", str(tmp_path / "got2"), legacy=True),
        await env.scp("alice@127.0.0.1:missing.txt", str(tmp_path / "got3")),
        await env.rsync(str(src), "alice@127.0.0.1:a/b/c/"),  # rsync's mkdir of a/b/c fails
        await env.rsync("alice@127.0.0.1:missing.txt", str(tmp_path / "got4")),  # rrsync's own message
        await env.rsync("-r", "alice@127.0.0.1:missing-dir/", str(tmp_path / "got5")),
    ]
    for res in said:
        assert res.rc != 0, res
        assert res.err.strip(), res
        for local in (homes_dir, str(env.cfg.data_dir), "/proc/self/fd", "/usr/bin/rrsync"):
            assert local not in res.err, (local, res)
    assert "No such file or directory: /missing.txt" in said[0].err  # the path as the client sees it
    assert 'mkdir "a/b/c" failed: No such file or directory' in said[4].err, said[4]
