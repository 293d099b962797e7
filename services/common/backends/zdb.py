"""The 0-db (zdb) backend: one namespace on one 0-db server.

0-db speaks RESP but is not Redis. What this driver does about the
differences (docs/engine.md, "0-db backends"):

* RESP2 only (``protocol=2``): redis-py 8 sends ``HELLO 3`` by default, which
  0-db refuses, and no ``CLIENT SETINFO`` (``driver_info=None``).
* The selected namespace belongs to the TCP connection. Every connection the
  pool opens (first use, or a reconnect after 0-db restarted) runs
  ``SELECT namespace [password]`` before anything else, so a reconnect can never
  silently land in ``default``.
* ``SET`` answers with the key (the new 8-byte id in seq mode), not ``+OK``; the
  client's SET response callback is replaced so the key is kept. A SET whose
  value equals the stored one answers nil: that is a success.
* Values over 8 MiB are refused here, before sending: 0-db closes the
  connection on ``-Payload too big``.
* ``SCAN`` goes through ``SCANX`` (a prefix alias) because redis-py parses the
  ``SCAN`` reply as an integer cursor; the end is ``-No more data``.
* ``DEL k x`` means "delete k with timestamp x", so ``delete`` sends one key.

GET and SET (shards and records: the data path) go through zdbwire.py instead of
redis-py: pipelined requests on up to ``wire_connections`` connections per
namespace, replies read in place; the other commands through redis-py. Both
SELECT the namespace and check the identity marker on every new connection, and
raise redis-py's exceptions, which ``_call`` maps the same way.

Identity (``open(..., marked=True)``, the shard backends): sequential ids
restart from 0 when a namespace is wiped and created again, so a key alone
cannot tell an old shard from a new one. The first time a namespace is used as
a shard backend, ``MARKER_PREFIX`` + 16 random bytes is stored as its first
value; those bytes are the backend's ``identity`` (records note it per
backend). Opening reads the first key of the namespace (SCAN): a marker is
adopted; an empty namespace gets one (two processes racing keep the lower
key, the other is deleted). Every new connection then GETs the marker key
right after SELECT: another value means the namespace was wiped and set up
again, and the backend adopts (or writes) the new marker before any command
runs on it, so no shard is ever written under the old identity. A namespace
that already held data without a marker (written before markers existed) has
no identity (``b""``); its wipes are found by shard sizes only.

Errors are the ``BackendError`` family from ``services.common.errors``; every
message starts with the backend's redacted URI and never contains a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, Final

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.connection import BlockingConnectionPool, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.common import errors
from services.common.backends.base import (
    SEQ_KEY_SIZE,
    Backend,
    BackendInfo,
    Mode,
    seq_id,
)
from services.common.backends.uri import ZdbURI, parse_uri
from services.common.backends.zdbwire import REMOVED, WirePool, select_namespace

__all__ = [
    "NamespaceModeMismatch",
    "NamespaceNotFound",
    "ZdbBackend",
    "ZdbConnection",
    "ensure_namespace",
]

#: How NSINFO spells each mode.
_NSINFO_MODE: Final = {Mode.SEQ: "sequential", Mode.USER: "userkey"}
#: How NSSET spells each mode.
_NSSET_MODE: Final = {Mode.SEQ: "seq", Mode.USER: "user"}

_NO_MORE_DATA: Final = "No more data"
_NOT_FOUND_REPLIES: Final = frozenset({"Key not found", "Invalid key, only update authorized"})
_ACCESS_DENIED_REPLIES: Final = frozenset(
    {"Access denied", "Namespace protected and private", "Permission denied", "Unauthorized"}
)
# Connection-level failures: the server is down, restarting, or too slow.
_UNAVAILABLE: Final = (rexc.ConnectionError, rexc.TimeoutError, OSError, asyncio.TimeoutError)

DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_MAX_CONNECTIONS: Final = 32
#: Pipelined connections per namespace for shard and record GET / SET (zdbwire.py).
DEFAULT_WIRE_CONNECTIONS: Final = 4
MARKER_PREFIX: Final = b"gridstor:backend-identity:v1:"
IDENTITY_BYTES: Final = 16

log = logging.getLogger(__name__)


class NamespaceNotFound(errors.BackendUnavailable):
    """The namespace does not exist on that 0-db (a configuration error, or it was removed)."""


class NamespaceModeMismatch(errors.BackendUnavailable):
    """The namespace runs in the other mode (sequential vs user key) than the one asked for."""


class _Secret:
    """A password that never shows up in a repr (redis-py prints connection kwargs)."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


class _Marker:
    """The identity marker a backend expects (shared by its connections); ``key`` None = nothing to check."""

    __slots__ = ("identity", "key", "replaced", "value")

    def __init__(self) -> None:
        self.key: bytes | None = None
        self.value = b""
        self.identity = b""
        self.replaced = False

    def set(self, key: bytes | None, value: bytes) -> None:
        self.key, self.value = key, value
        self.identity = value[len(MARKER_PREFIX) :] if key is not None else b""
        self.replaced = False

    def __repr__(self) -> str:
        return f"<marker {self.identity.hex() or 'none'}>"


def _is_marker(value: object) -> bool:
    size = len(MARKER_PREFIX) + IDENTITY_BYTES
    return isinstance(value, bytes) and value.startswith(MARKER_PREFIX) and len(value) == size


def _keep_reply(response: Any, **_options: Any) -> Any:
    """A response callback that returns the raw reply (0-db's SET/AUTH replies carry data)."""
    return response


class ZdbConnection(Connection):
    """A redis-py connection that selects its 0-db namespace whenever it (re)connects.

    redis-py 8 runs ``on_connect_check_health`` (not ``on_connect``) from
    ``connect()``, and ``on_connect`` delegates to it, so extending it covers
    both paths. A failed SELECT raises from ``connect()``; redis-py then drops
    the socket, so a connection is never left in ``default``.
    """

    def __init__(
        self,
        *,
        zdb_namespace: str | None = None,
        zdb_password: _Secret | None = None,
        zdb_marker: _Marker | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.zdb_namespace = zdb_namespace
        self._zdb_password = zdb_password
        self._zdb_marker = zdb_marker

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health=check_health)
        if self.zdb_namespace is not None:
            await select_namespace(self._call, self.zdb_namespace, self._zdb_password, self._zdb_marker)

    async def _call(self, *args: str | bytes) -> Any:
        await self.send_command(*args, check_health=False)
        return await self.read_response()

    def repr_pieces(self) -> list[tuple[str, Any]]:
        pieces: list[tuple[str, Any]] = list(super().repr_pieces())  # type: ignore[no-untyped-call]
        pieces.append(("namespace", self.zdb_namespace))
        return pieces


def _parse_nsinfo(reply: Any) -> dict[str, str]:
    """NSINFO's ``key: value`` text as a dict (comment lines skipped)."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _int_field(fields: dict[str, str], key: str) -> int | None:
    try:
        return int(fields[key])
    except (KeyError, ValueError):
        return None


def _describe_key(key: bytes) -> str:
    if len(key) == SEQ_KEY_SIZE:
        return f"{key.hex()} (seq id {seq_id(key)})"
    return repr(key) if len(key) <= 64 else f"{key[:64]!r}... ({len(key)} bytes)"


def _map_response_error(name: str, uri: ZdbURI, exc: rexc.ResponseError) -> errors.BackendError:
    """Translate a 0-db error reply into the gridstor error it means."""
    reply = str(exc)
    lowered = reply.lower()
    where = f"{uri.host}:{uri.port}"
    if "no space left" in lowered:
        return errors.NamespaceFull(name, f"namespace is full (0-db: {reply})")
    if "read-only" in lowered or "locked" in lowered or "frozen" in lowered or "worm mode" in lowered:
        return errors.ReadOnly(name, f"namespace refuses writes (0-db: {reply})")
    if reply in _ACCESS_DENIED_REPLIES:
        return errors.AccessDenied(name, f"access denied (0-db: {reply})")
    if reply == "Namespace not found":
        return NamespaceNotFound(name, f"namespace {uri.namespace} not found on {where}")
    if REMOVED in lowered:
        return NamespaceNotFound(name, f"namespace {uri.namespace} was removed from {where} (0-db: {reply})")
    if reply in _NOT_FOUND_REPLIES:
        return errors.KeyNotFound(name, f"key not found (0-db: {reply})")
    return errors.BackendError(name, f"unexpected 0-db error: {reply}")


def _unavailable(name: str, exc: BaseException) -> errors.BackendUnavailable:
    detail = str(exc) or type(exc).__name__
    return errors.BackendUnavailable(name, f"0-db unreachable: {detail}")


class ZdbBackend(Backend):
    """A gridstor backend on one 0-db namespace. Build it with ``await ZdbBackend.open(...)``."""

    def __init__(
        self,
        uri: ZdbURI,
        mode: Mode,
        client: aioredis.Redis,
        marker: _Marker | None = None,
        wire: WirePool | None = None,
    ) -> None:
        """Wrap an already configured client (and data path: ``wire``); use :meth:`open` instead."""
        self.uri = uri
        self.name = uri.redacted
        self.mode = mode
        self._client = client
        self._wire = wire
        self._closed = False
        self._marker = marker if marker is not None else _Marker()
        self._identify_lock = asyncio.Lock()

    @property
    def identity(self) -> bytes:
        return self._marker.identity

    @property
    def marker_key(self) -> bytes | None:
        return self._marker.key

    @classmethod
    async def open(
        cls,
        uri: ZdbURI,
        mode: Mode,
        *,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - a per-request socket timeout, not a deadline
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        marked: bool = False,
        wire_connections: int = DEFAULT_WIRE_CONNECTIONS,
    ) -> ZdbBackend:
        """Connect, SELECT the namespace and check with NSINFO that it runs in ``mode``.

        ``marked`` (shard backends, seq mode): read the namespace's identity
        marker, writing one into an empty namespace (see the module docstring).
        ``wire_connections``: pipelined connections of the data path (GET and
        SET of shards and records, zdbwire.py); 0 = every command through redis-py.
        Raises ``NamespaceNotFound``, ``AccessDenied`` (wrong password, private
        namespace), ``NamespaceModeMismatch`` or ``BackendUnavailable``.
        """
        if marked and mode is not Mode.SEQ:
            raise errors.InvalidInput(f"{uri.redacted}: identity markers are for sequential (shard) namespaces")
        marker = _Marker()
        password = _Secret(uri.password) if uri.password else None
        pool = BlockingConnectionPool(
            connection_class=ZdbConnection,
            max_connections=max_connections,
            timeout=timeout,
            host=uri.host,
            port=uri.port,
            protocol=2,
            driver_info=None,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            socket_keepalive=True,
            health_check_interval=0,
            retry=Retry(NoBackoff(), 0),
            zdb_namespace=uri.namespace,
            zdb_password=password,
            zdb_marker=marker,
        )
        client = aioredis.Redis(connection_pool=pool)
        client.set_response_callback("SET", _keep_reply)
        wire = (
            WirePool(uri.host, uri.port, uri.namespace, password, marker, timeout, wire_connections)
            if wire_connections > 0
            else None
        )
        backend = cls(uri, mode, client, marker, wire)
        try:
            fields = await backend._nsinfo()
            actual = fields.get("mode", "?")
            if actual != _NSINFO_MODE[mode]:
                raise NamespaceModeMismatch(
                    backend.name,
                    f"namespace {uri.namespace} is in {actual} mode but a {mode.value} backend needs "
                    f"{_NSINFO_MODE[mode]} mode (create it with ensure_namespace(mode=Mode.{mode.name}))",
                )
            if marked:
                await backend._identify()
        except BaseException:
            await backend.close()
            raise
        return backend

    # -- plumbing ---------------------------------------------------------

    async def _call(
        self, *args: bytes | str | int, retry: bool = True, end_ok: bool = False, data: bool = False
    ) -> Any:
        """Run one command and map its errors.

        ``retry``: on a dropped connection, try once more on a fresh one (only
        for commands that are safe to repeat). ``end_ok``: ``-No more data``
        returns None instead of raising. ``data``: a GET or SET, which goes
        through the pipelined data path when there is one (its replies are a
        bulk string, nil, or an error).
        """
        if self._closed:
            raise errors.BackendUnavailable(self.name, "backend is closed")
        attempts = 2 if retry else 1
        attempt = 0
        wire = self._wire if data else None
        heard_removal = False
        while True:
            attempt += 1
            if self._marker.replaced:
                await self._reidentify()
            try:
                if wire is not None:
                    return await wire.request(*args)
                return await self._client.execute_command(*args)  # type: ignore[no-untyped-call]
            except rexc.ResponseError as exc:
                if end_ok and str(exc) == _NO_MORE_DATA:
                    return None
                if not heard_removal and REMOVED in str(exc).lower():
                    # An idle connection hears of its namespace's removal in reply to the next command, which
                    # did not run (0-db drops the connection): once more on a new connection, which finds the
                    # namespace missing, or replaced (its marker: set up anew first).
                    heard_removal = True
                    attempt -= 1
                    continue
                raise _map_response_error(self.name, self.uri, exc) from exc
            except (rexc.TimeoutError, TimeoutError) as exc:  # never repeated: it would double the wait
                raise _unavailable(self.name, exc) from exc
            except _UNAVAILABLE as exc:
                if self._marker.replaced:
                    # A new connection found the namespace replaced before the command was sent: set the
                    # new data set up, then run the command there (safe for any command: it never ran).
                    attempt -= 1
                    continue
                if attempt < attempts:
                    continue
                raise _unavailable(self.name, exc) from exc

    async def _nsinfo(self) -> dict[str, str]:
        return _parse_nsinfo(await self._call("NSINFO", self.uri.namespace))

    # -- identity -----------------------------------------------------------

    async def _edge_key(self, command: str) -> bytes | None:
        """The first key (SCANX) or the last one (RSCAN) of the namespace; None when it is empty."""
        reply = await self._call(command, end_ok=True)
        if reply is None:
            return None
        try:
            return bytes(reply[1][0][0])
        except (TypeError, IndexError, ValueError) as exc:
            raise errors.BackendError(self.name, f"unexpected reply to {command}: {reply!r:.200}") from exc

    async def _identify(self) -> None:
        """Adopt the namespace's marker (its first value), or write one into an empty namespace."""
        self._marker.set(None, b"")  # no check on the connections used meanwhile
        first = await self._edge_key("SCANX")
        if first is None:
            value = MARKER_PREFIX + os.urandom(IDENTITY_BYTES)
            key = await self._call("SET", b"", value, retry=False)
            first = await self._edge_key("SCANX")
            if first != key:  # another process set the namespace up at the same moment: the first value wins
                with contextlib.suppress(errors.KeyNotFound):
                    await self._call("DEL", bytes(key), retry=False)
            else:
                self._marker.set(key, value)
                log.info("%s: new backend identity %s written", self.name, value[len(MARKER_PREFIX) :].hex())
                return
        if first is None:
            raise errors.BackendUnavailable(self.name, "the namespace emptied while its identity was being written")
        value = await self._call("GET", first)
        if _is_marker(value):
            self._marker.set(first, value)
        else:
            log.warning(
                "%s holds data but no identity marker (written before markers existed): a wipe of it can only be"
                " told from shard sizes",
                self.name,
            )

    async def _reidentify(self) -> None:
        """A connection found another marker: adopt the namespace's new identity (once, for every caller)."""
        async with self._identify_lock:
            if not self._marker.replaced:
                return
            old = self._marker.identity.hex() or "none"
            try:
                await self._identify()
            except BaseException:
                # Not identified (e.g. a connection still held news of the removal): the next call tries again.
                self._marker.replaced = True
                raise
            log.warning(
                "%s was wiped and set up again: identity %s -> %s; shards of older records on it are gone",
                self.name,
                old,
                self._marker.identity.hex() or "none",
            )

    # -- Backend ----------------------------------------------------------

    async def put(self, value: bytes) -> bytes:
        self._check_put(value)
        # Not repeated on a dropped connection: the first SET may have been
        # stored, and a second one would allocate a second id.
        key = await self._call("SET", b"", bytes(value), retry=False, data=True)
        if not isinstance(key, bytes) or len(key) != SEQ_KEY_SIZE:
            raise errors.BackendError(self.name, f"unexpected reply to SET in seq mode: {key!r}")
        return key

    async def set(self, key: bytes, value: bytes) -> None:
        self._check_value(value)
        if not self._is_possible_key(key):
            raise errors.KeyNotFound(
                self.name, f"cannot update {_describe_key(key)}: a sequential key has {SEQ_KEY_SIZE} bytes"
            )
        try:
            reply = await self._call("SET", bytes(key), bytes(value), data=True)
        except errors.KeyNotFound as exc:
            raise errors.KeyNotFound(self.name, f"cannot update {_describe_key(key)}: not stored") from exc
        # The key, or nil when the stored value is already byte-for-byte equal.
        if reply is not None and reply != key:
            raise errors.BackendError(self.name, f"unexpected reply to SET: {reply!r}")

    async def get(self, key: bytes) -> bytes | None:
        if not self._is_possible_key(key):
            return None
        value = await self._call("GET", bytes(key), data=True)
        if value is not None and not isinstance(value, bytes):
            raise errors.BackendError(self.name, f"unexpected reply to GET: {type(value).__name__}")
        return value

    async def exists(self, key: bytes) -> bool:
        if not self._is_possible_key(key):
            return False
        return bool(await self._call("EXISTS", bytes(key)))

    async def length(self, key: bytes) -> int | None:
        if not self._is_possible_key(key):
            return None
        reply = await self._call("LENGTH", bytes(key))
        if reply is None:
            return None
        if not isinstance(reply, int):
            raise errors.BackendError(self.name, f"unexpected reply to LENGTH: {reply!r:.100}")
        return reply

    async def high_water(self) -> int:
        """The last key + 1 (RSCAN): later sequential ids are higher; 0 for an empty namespace."""
        if self.mode is not Mode.SEQ:
            raise errors.InvalidInput(f"{self.name}: a high water mark needs a sequential namespace")
        last = await self._edge_key("RSCAN")
        return seq_id(last) + 1 if last is not None and len(last) == SEQ_KEY_SIZE else 0

    async def delete(self, key: bytes) -> None:
        if not self._is_possible_key(key):
            raise errors.KeyNotFound(self.name, f"cannot delete {_describe_key(key)}: not stored")
        try:
            # Exactly one argument: "DEL k x" would be DEL with timestamp x.
            # Not repeated: a second DEL after a lost reply would say "Key not found".
            await self._call("DEL", bytes(key), retry=False)
        except errors.KeyNotFound as exc:
            raise errors.KeyNotFound(self.name, f"cannot delete {_describe_key(key)}: not stored") from exc

    async def scan(self, after: bytes | None = None) -> AsyncIterator[bytes]:
        """Yield keys in 0-db's order: id order in seq mode, last-write order in user mode.

        Resuming after a key that was deleted meanwhile: in seq mode the scan
        restarts from the beginning and skips ids up to ``after``; in user mode
        there is no order to fall back on, so it raises ``KeyNotFound``.
        """
        cursor: bytes | None = None
        skip_through: int | None = None
        if after is not None:
            self._check_key(after)
            try:
                cursor = await self._call("KEYCUR", bytes(after))
            except errors.KeyNotFound as exc:
                if self.mode is Mode.SEQ and len(after) == SEQ_KEY_SIZE:
                    skip_through = seq_id(bytes(after))
                else:
                    raise errors.KeyNotFound(
                        self.name, f"cannot resume a scan after {_describe_key(after)}: it is not stored"
                    ) from exc
        while True:
            reply = (
                await self._call("SCANX", end_ok=True)
                if cursor is None
                else await self._call("SCANX", cursor, end_ok=True)
            )
            if reply is None:
                return
            try:
                cursor, entries = reply[0], reply[1]
                keys = [entry[0] for entry in entries]
            except (TypeError, IndexError, ValueError) as exc:
                raise errors.BackendError(self.name, f"unexpected reply to SCAN: {reply!r:.200}") from exc
            for key in keys:
                if skip_through is not None and len(key) == SEQ_KEY_SIZE and seq_id(key) <= skip_through:
                    continue
                yield key

    async def info(self) -> BackendInfo:
        """Entries and live payload bytes from NSINFO.

        ``free_bytes`` is the smaller of the quota left (``space_available``,
        present when a maxsize is set) and the free space on the data disk;
        None when NSINFO reports neither.
        """
        fields = await self._nsinfo()
        entries = _int_field(fields, "entries")
        used = _int_field(fields, "data_size_bytes")
        if entries is None or used is None:
            raise errors.BackendError(self.name, "NSINFO reply lacks entries / data_size_bytes")
        candidates: list[int] = []
        quota_left = _int_field(fields, "space_available")
        if quota_left is None:
            limit = _int_field(fields, "data_limits_bytes")
            if limit:
                quota_left = max(0, limit - used)
        if quota_left is not None:
            candidates.append(max(0, quota_left))
        disk_free = _int_field(fields, "data_disk_freespace_bytes")
        if disk_free is not None:
            candidates.append(max(0, disk_free))
        return BackendInfo(entries=entries, used_bytes=used, free_bytes=min(candidates) if candidates else None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._wire is not None:
            self._wire.close()
        await self._client.aclose(close_connection_pool=True)


# -- administration -------------------------------------------------------


async def _admin_call(client: aioredis.Redis, name: str, command: str, *args: str | int) -> Any:
    """One admin command on a plain (default-namespace) connection, errors mapped."""
    try:
        return await client.execute_command(command, *args)  # type: ignore[no-untyped-call]
    except rexc.ResponseError as exc:
        reply = str(exc)
        if reply in {"Permission denied", "Unauthorized"}:
            raise errors.AccessDenied(
                name,
                f"{command} needs 0-db admin rights (0-db: {reply}); pass the server's --admin password "
                "as admin_password",
            ) from exc
        if reply == "Namespace not found":
            raise NamespaceNotFound(name, f"namespace {args[0]} not found") from exc
        raise errors.BackendError(name, f"{command} failed (0-db: {reply})") from exc
    except _UNAVAILABLE as exc:
        raise _unavailable(name, exc) from exc


async def _admin_auth(client: aioredis.Redis, name: str, admin_password: str) -> None:
    """Authenticate as admin with AUTH SECURE (the password never crosses the wire)."""
    try:
        nonce = await client.execute_command("AUTH", "SECURE", "CHALLENGE")  # type: ignore[no-untyped-call]
        if isinstance(nonce, bytes):
            nonce = nonce.decode("ascii", "replace")
        digest = hashlib.sha1(f"{nonce}:{admin_password}".encode()).hexdigest()
        await client.execute_command("AUTH", "SECURE", digest)  # type: ignore[no-untyped-call]
    except rexc.ResponseError as exc:
        reply = str(exc)
        if reply == "Authentication disabled":
            return  # the server has no --admin password: every client is admin
        if reply == "Access denied":
            raise errors.AccessDenied(name, "wrong 0-db admin password") from exc
        raise errors.BackendError(name, f"AUTH failed (0-db: {reply})") from exc
    except _UNAVAILABLE as exc:
        raise _unavailable(name, exc) from exc


async def ensure_namespace(
    host: str,
    port: int,
    namespace: str,
    *,
    mode: Mode,
    password: str | None = None,
    admin_password: str | None = None,
    maxsize: int | None = None,
    public: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - a per-request socket timeout, not a deadline
) -> None:
    """Create ``namespace`` on a 0-db if it is missing and bring its settings in line. Idempotent.

    * ``mode``: set with ``NSSET mode`` when it differs; 0-db only allows that on
      an empty namespace of a mixed-mode server, otherwise
      ``NamespaceModeMismatch`` explains why.
    * ``password``: set when given (None leaves the current password alone; it
      is never cleared implicitly).
    * ``maxsize``: quota in bytes of live payload (0 = unlimited); None leaves it.
    * ``public``: with a password, whether clients without it may read
      (0-db's default is yes); None leaves it.

    Admin commands need the server's ``--admin`` password as ``admin_password``
    (a server started without ``--admin`` treats everyone as admin);
    ``AccessDenied`` says so when it is missing or wrong.
    """
    uri = parse_uri(ZdbURI(host=host, port=port, namespace=namespace).redacted)
    assert isinstance(uri, ZdbURI)
    name = uri.redacted
    if password == "":
        raise errors.InvalidInput(f"{name}: an empty namespace password is not allowed (use None)")
    if maxsize is not None and maxsize < 0:
        raise errors.InvalidInput(f"{name}: maxsize must be >= 0 bytes, got {maxsize}")
    client = aioredis.Redis(
        host=host,
        port=port,
        protocol=2,
        driver_info=None,
        single_connection_client=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    client.set_response_callback("AUTH", _keep_reply)
    try:
        if admin_password:
            await _admin_auth(client, name, admin_password)
        fields = await _nsinfo_or_none(client, name, namespace)
        if fields is None:
            try:
                await _admin_call(client, name, "NSNEW", namespace)
            except (errors.AccessDenied, errors.BackendUnavailable):
                raise
            except errors.BackendError as exc:
                if "This namespace is not available" not in exc.reason:  # created meanwhile: fine
                    raise
            fields = await _nsinfo_or_none(client, name, namespace)
            if fields is None:
                raise NamespaceNotFound(name, f"namespace {namespace} vanished right after NSNEW on {host}:{port}")

        actual_mode = fields.get("mode")
        if actual_mode != _NSINFO_MODE[mode]:
            if _int_field(fields, "entries") not in (0, None):
                raise NamespaceModeMismatch(
                    name,
                    f"namespace {namespace} holds data in {actual_mode} mode; it cannot become {_NSINFO_MODE[mode]}",
                )
            try:
                await _admin_call(client, name, "NSSET", namespace, "mode", _NSSET_MODE[mode])
            except (errors.AccessDenied, errors.BackendUnavailable):
                raise
            except errors.BackendError as exc:
                raise NamespaceModeMismatch(
                    name,
                    f"cannot switch namespace {namespace} from {actual_mode} to {_NSINFO_MODE[mode]}: {exc.reason}",
                ) from exc

        if maxsize is not None and _int_field(fields, "data_limits_bytes") != maxsize:
            await _admin_call(client, name, "NSSET", namespace, "maxsize", maxsize)
        if public is not None and (fields.get("public") == "yes") != public:
            await _admin_call(client, name, "NSSET", namespace, "public", int(public))
        if password is not None:
            # NSINFO only says whether a password is set, not which: always set it.
            await _admin_call(client, name, "NSSET", namespace, "password", password)
    finally:
        await client.aclose()


async def _nsinfo_or_none(client: aioredis.Redis, name: str, namespace: str) -> dict[str, str] | None:
    try:
        return _parse_nsinfo(await _admin_call(client, name, "NSINFO", namespace))
    except NamespaceNotFound:
        return None
