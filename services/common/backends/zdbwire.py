"""The 0-db data path: pipelined GET / SET on a few connections per namespace, replies read in place.

redis-py (zdb.py's client for everything else) reads a reply through an
asyncio StreamReader: the bytes are copied into its buffer, which pauses the
socket at 128 KiB, out of it, and once more to drop the CRLF, over many event
loop turns for one 256 KiB shard. Here a ``asyncio.BufferedProtocol`` reads
each bulk reply's payload straight into a buffer of its size (one copy more,
to hand out ``bytes``), and requests are pipelined: a connection carries many
at once, replies come back in order (0-db answers each connection's requests
in turn), so a few connections per namespace (``WirePool``: a request goes to
the least busy, a new one opens while all are busy, up to its size) serve all
the concurrent shard reads and writes of the engine without a round trip each.

Each new connection runs ``SELECT namespace [password]`` and, for a marked
backend, checks the identity marker (the same rules as ``ZdbConnection``)
before it carries a request. Errors are redis-py's (``ResponseError`` for an
error reply, ``ConnectionError`` for a lost or refused connection,
``TimeoutError``), so zdb.py maps both paths the same way. A request that gets
no reply within the timeout closes its connection (the next request opens a
new one); a caller cancelled while waiting leaves the connection in step: its
reply is read and dropped.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from redis import exceptions as rexc

from services.common.backends.base import MAX_VALUE_SIZE

if TYPE_CHECKING:
    from services.common.backends.zdb import _Marker, _Secret

__all__ = ["WireConnection", "WirePool", "select_namespace"]

LINE_BUFFER: Final = 16 * 1024
"""Bytes read at a time outside bulk payloads (status lines, bulk headers); grows for a longer line."""
MAX_LINE: Final = 64 * 1024
"""A reply line longer than this is not 0-db's: the connection fails (memory stays bounded)."""
MAX_BULK: Final = MAX_VALUE_SIZE
"""0-db stores no value over 8 MiB; a bulk reply announcing more fails the connection before any allocation."""

_CRLF: Final = b"\r\n"
REMOVED: Final = "active namespace is not available"  # lowercase: a connection's namespace was deleted


async def select_namespace(
    call: Callable[..., Awaitable[Any]], namespace: str, password: _Secret | None, marker: _Marker | None
) -> None:
    """What every new connection to a namespace runs first, on redis-py's connections and on these: ``SELECT``
    (with the password), then, for a marked backend, a look at the identity marker. ``call(*args)`` sends one
    command and returns its reply. A replaced namespace (another marker) is noted on ``marker`` and refused.
    """
    args: list[str] = ["SELECT", namespace]
    if password is not None:
        args.append(password.value)
    # An error reply (Namespace not found, Access denied...) is raised as it is: the caller maps it.
    reply = await call(*args)
    if reply != b"OK":
        raise rexc.ConnectionError(f"unexpected reply to SELECT {namespace}: {reply!r}")
    if marker is not None and marker.key is not None and await call("GET", marker.key) != marker.value:
        marker.replaced = True
        raise rexc.ConnectionError(
            f"namespace {namespace} holds another data set now (its identity marker changed: wiped and set up again)"
        )


def _encode(arg: bytes | str | int) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    return str(arg).encode()


class WireConnection(asyncio.BufferedProtocol):
    """One connection: requests go out as they come, each reply resolves the oldest waiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.closed = False
        self._lines = bytearray(LINE_BUFFER)
        self._start = 0
        self._end = 0
        self._bulk: bytearray | None = None
        self._bulk_got = 0
        self._paused: asyncio.Future[None] | None = None

    # -- asyncio.BufferedProtocol ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._bulk is not None:  # the rest of a payload: straight into its buffer
            return memoryview(self._bulk)[self._bulk_got :]
        if self._end == len(self._lines):
            if self._start:  # move the unparsed tail to the front
                tail = self._end - self._start
                self._lines[:tail] = self._lines[self._start : self._end]
                self._start, self._end = 0, tail
            else:  # one line longer than the buffer (at most MAX_LINE: _parse fails a longer one)
                self._lines.extend(bytes(len(self._lines)))
        return memoryview(self._lines)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._bulk is not None:
            self._bulk_got += nbytes
            if self._bulk_got < len(self._bulk):
                return
            self._finish_bulk()
        else:
            self._end += nbytes
        try:
            self._parse()
        except (ValueError, IndexError) as exc:
            self._fail(rexc.ConnectionError(f"0-db sent a reply this client cannot read: {exc}"))

    def eof_received(self) -> bool | None:
        self._fail(rexc.ConnectionError("0-db closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(rexc.ConnectionError(f"connection to 0-db lost: {exc}" if exc else "connection to 0-db closed"))
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    def pause_writing(self) -> None:
        if self._paused is None or self._paused.done():
            self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    # -- replies -------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._lines
        while self._bulk is None and self._start < self._end:
            nl = buf.find(_CRLF, self._start, self._end)
            if nl < 0:
                if self._end - self._start > MAX_LINE:
                    raise ValueError(f"a reply line over {MAX_LINE} bytes")
                break
            kind, line = buf[self._start], bytes(buf[self._start + 1 : nl])
            self._start = nl + 2
            if kind == 0x24:  # $ bulk
                n = int(line)
                if n > MAX_BULK:
                    raise ValueError(f"a value of {n} bytes, over 0-db's {MAX_BULK}")
                if n < 0:
                    self._deliver(None)
                    continue
                bulk = bytearray(n + 2)
                have = min(self._end - self._start, n + 2)
                bulk[:have] = buf[self._start : self._start + have]
                self._start += have
                self._bulk, self._bulk_got = bulk, have
                if have == n + 2:
                    self._finish_bulk()
            elif kind == 0x2B:  # + status
                self._deliver(line)
            elif kind == 0x2D:  # - error
                text = line.decode("utf-8", "replace")
                self._deliver(rexc.ResponseError(text))
                if REMOVED in text:  # 0-db drops the connection after this
                    self._fail(rexc.ConnectionError(f"0-db: {text}"))
                    return
            elif kind == 0x3A:  # : integer
                self._deliver(int(line))
            else:
                raise ValueError(f"unexpected reply type {chr(kind)!r}")
        if self._start == self._end:
            self._start = self._end = 0

    def _finish_bulk(self) -> None:
        bulk = self._bulk
        assert bulk is not None
        self._bulk = None
        self._deliver(bytes(memoryview(bulk)[:-2]))

    def _deliver(self, value: Any) -> None:
        if not self.waiters:
            raise ValueError("a reply nobody asked for")
        waiter = self.waiters.popleft()
        if waiter.done():  # its caller was cancelled: the reply is read and dropped
            return
        if isinstance(value, BaseException):
            waiter.set_exception(value)
        else:
            waiter.set_result(value)

    def _fail(self, exc: Exception) -> None:
        """Fail every waiting request and close: the replies on this connection are out of step or gone."""
        self.closed = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # -- requests --------------------------------------------------------------

    def send(self, args: tuple[bytes | str | int, ...]) -> asyncio.Future[Any]:
        """Queue one request; the future resolves with its reply (or raises its error)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise rexc.ConnectionError("connection to 0-db closed")
        parts = [_encode(a) for a in args]
        head = bytearray(b"*%d\r\n" % len(parts))
        write = self.transport.write
        for part in parts:
            head += b"$%d\r\n" % len(part)
            if len(part) > 4096:  # a value: written as it is, not copied into the header first
                write(head)
                write(part)
                head = bytearray(_CRLF)
            else:
                head += part
                head += _CRLF
        write(head)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return waiter

    async def request(self, *args: bytes | str | int, timeout: float) -> Any:  # noqa: ASYNC109
        """Send one request and wait for its reply; no reply in ``timeout`` s closes the connection."""
        waiter = self.send(args)
        try:
            async with asyncio.timeout(timeout):
                if self._paused is not None and not self._paused.done():
                    await asyncio.shield(self._paused)  # the kernel's send buffer is full: wait for it
                return await waiter
        except TimeoutError:
            self._fail(rexc.TimeoutError(f"no reply from 0-db within {timeout:g} s"))
            raise rexc.TimeoutError(f"no reply from 0-db within {timeout:g} s") from None

    def close(self) -> None:
        self._fail(rexc.ConnectionError("connection closed by this client"))


class WirePool:
    """Up to ``size`` pipelined connections to one namespace; a request goes to the least busy one."""

    def __init__(
        self,
        host: str,
        port: int,
        namespace: str,
        password: _Secret | None,
        marker: _Marker | None,
        timeout: float,
        size: int,
    ) -> None:
        self.host, self.port, self.namespace = host, port, namespace
        self._password = password
        self._marker = marker
        self.timeout = timeout
        self.size = max(1, size)
        self.conns: list[WireConnection] = []
        self._opening = asyncio.Lock()
        self._closed = False

    async def request(self, *args: bytes | str | int) -> Any:
        conn = await self._pick()
        return await conn.request(*args, timeout=self.timeout)

    async def _pick(self) -> WireConnection:
        if self._closed:
            raise rexc.ConnectionError("backend closed")
        self.conns = [c for c in self.conns if not c.closed]
        best = min(self.conns, key=lambda c: len(c.waiters), default=None)
        if best is not None and (not best.waiters or len(self.conns) >= self.size):
            return best
        async with self._opening:  # one connection opens at a time; the others pipeline meanwhile
            self.conns = [c for c in self.conns if not c.closed]
            best = min(self.conns, key=lambda c: len(c.waiters), default=None)
            if best is not None and (not best.waiters or len(self.conns) >= self.size):
                return best
            conn = await self._open()
            self.conns.append(conn)
            return conn

    async def _open(self) -> WireConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                transport, conn = await loop.create_connection(WireConnection, self.host, self.port)
        except TimeoutError:
            where = f"{self.host}:{self.port}"
            raise rexc.TimeoutError(f"connecting to 0-db {where} took over {self.timeout:g} s") from None
        except OSError as exc:
            raise rexc.ConnectionError(f"cannot connect to 0-db {self.host}:{self.port}: {exc}") from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            await select_namespace(
                functools.partial(conn.request, timeout=self.timeout), self.namespace, self._password, self._marker
            )
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        self._closed = True
        for conn in self.conns:
            conn.close()
        self.conns = []
