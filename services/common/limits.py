"""Per-client limits shared through Redis, so every process of the gateway counts together.

Two kinds, each per identity (the token's subject) and per client address:

* **requests per second**: a token bucket per key (``rate`` per second,
  ``burst`` at once), checked for both keys in one Lua script so a refused
  request consumes nothing; the answer says how long to wait.
* **concurrent uploads**: a sorted set of leases per key, scored by expiry.
  A lease is taken when an Upload starts, refreshed while it runs and removed
  in ``finally``; a process that dies mid-upload leaves leases that expire
  after ``LEASE_TTL`` seconds (the safety net a plain counter lacks).

Over a limit raises ``errors.RateLimited`` (RESOURCE_EXHAUSTED, trailer
``retry-after``, message "... retry in N s"; HTTP 429 through Envoy).

The client address is the gRPC peer; when the peer is a trusted proxy
(``limits.trusted_proxies``, Envoy's address) it is the address Envoy saw:
``x-envoy-external-address``, else the last entry of ``x-forwarded-for``
(both set by Envoy with ``use_remote_address``), so a client cannot choose
it. IPv6 clients are counted per /64, what one host usually gets. Addresses
in ``limits.exempt`` (loopback by default: the gateway's own machine) and
service or operator tokens are never limited.
If Redis cannot be reached the limits are skipped (logged), never the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, TypeVar
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import errors
from services.common.config import LimitsConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

UPLOAD_METHODS = frozenset({"/gridstor.v1.IngestService/Upload"})
UNLIMITED_PREFIXES = ("service:", "admin:")  # the gateway's own services and its operators
LEASE_TTL = 60.0  # seconds a lease outlives a process that died without releasing it
UPLOAD_RETRY_AFTER = 5  # seconds to suggest when too many uploads run: when one ends is unknown
REDIS_COOLDOWN = 5.0  # seconds without limits after Redis failed, so a dead Redis costs no time per call
LOG_EVERY = 60.0
HOSTNAME_TTL = 60.0  # seconds a resolved host name of exempt / trusted_proxies is kept
KEY_PREFIX = "gridstor:limit:"

# KEYS: buckets; ARGV: rate, burst per bucket. Refill, then take one token from every bucket or from none.
# Returns {0, 0} when admitted, else {milliseconds to wait, index of the bucket that is empty}.
_RATE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local level = {}
local wait, which = 0, 0
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local v = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(v[1]) or burst, tonumber(v[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  level[i] = tokens
  if tokens < 1 then
    local w = math.ceil((1 - tokens) * 1000 / rate)
    if w > wait then wait, which = w, i end
  end
end
if wait > 0 then return {wait, which} end
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  redis.call('HSET', key, 'tokens', tostring(level[i] - 1), 'ts', now)
  redis.call('PEXPIRE', key, math.ceil(burst * 1000 / rate) + 1000)
end
return {0, 0}
"""

# KEYS: lease sets; ARGV: token, ttl ms, then a limit per set. Drop expired leases; take one in every set
# or in none. Returns 0 when taken, else the index of the full set.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[2 + i]) then return i end
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', key, tonumber(ARGV[2]) + 1000)
end
return 0
"""

# KEYS: lease sets; ARGV: token, ttl ms. Push the lease's expiry on (only if it is still there).
_REFRESH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', key, tonumber(ARGV[2]) + 1000)
end
return 0
"""


def peer_address(peer: str) -> str:
    """The IP address in a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``); "" for unix sockets."""
    peer = unquote(peer)
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0] if rest.startswith("[") else rest
        return host.strip("[]").split("%")[0]
    return ""


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_key(address: str) -> str:
    """How an address is counted: itself for IPv4, its /64 for IPv6 (one host's usual allocation)."""
    ip = _ip(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip) if ip is not None else address


class AddressSet:
    """IP addresses, networks and host names (resolved, cached for a minute) from the config."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.networks: list[Network] = []
        self.hostnames: list[str] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hostnames.append(entry)
        self._resolved: list[Network] = []
        self._resolved_at = -math.inf

    async def contains(self, address: str) -> bool:
        ip = _ip(address)
        if ip is None:
            return False
        if any(ip in n for n in self.networks):
            return True
        if not self.hostnames:
            return False
        if time.monotonic() - self._resolved_at > HOSTNAME_TTL:
            self._resolved = await self._resolve()
            self._resolved_at = time.monotonic()
        return any(ip in n for n in self._resolved)

    async def _resolve(self) -> list[Network]:
        loop = asyncio.get_running_loop()
        out: list[Network] = []
        for name in self.hostnames:
            try:
                infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            except OSError:
                continue  # e.g. a compose service that is not up yet: not trusted until it resolves
            for info in infos:
                with contextlib.suppress(ValueError):
                    out.append(ipaddress.ip_network(str(info[4][0]), strict=False))
        return out


class Limiter:
    """The limits of ``LimitsConfig`` over the Redis at ``redis_url`` (connected on first need)."""

    def __init__(
        self, limits: LimitsConfig, redis_url: str, *, upload_methods: frozenset[str] = UPLOAD_METHODS
    ) -> None:
        self.limits = limits
        self.redis_url = redis_url
        self.upload_methods = upload_methods
        self.exempt = AddressSet(limits.exempt)
        self.trusted = AddressSet(limits.trusted_proxies)
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._down_until = 0.0
        self._logged_at = -math.inf

    @property
    def active(self) -> bool:
        """Whether any limit is configured at all."""
        lim = self.limits
        return any((lim.rate_per_identity, lim.rate_per_address, lim.uploads_per_identity, lim.uploads_per_address))

    async def client_address(self, peer: str, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The client's address: the peer's, or the one a trusted proxy appended to x-forwarded-for."""
        address = peer_address(peer)
        if not address or not await self.trusted.contains(address):
            return address
        headers: dict[str, str] = {}
        for key, value in metadata:
            if key in ("x-envoy-external-address", "x-forwarded-for"):
                headers[key] = value.decode() if isinstance(value, bytes) else value
        # Envoy sets x-envoy-external-address to the client it saw (overwriting any a client sent). It
        # also appends that address to x-forwarded-for, except for a client on 127.0.0.1, where it
        # appends its own non-loopback address instead: so the first header is the exact one.
        for candidate in (
            headers.get("x-envoy-external-address", ""),
            headers.get("x-forwarded-for", "").rsplit(",", 1)[-1],
        ):
            if _ip(candidate.strip()) is not None:
                return candidate.strip()
        return address

    async def unlimited(self, identity: str, address: str) -> bool:
        """Whether this caller skips every limit (services, operators, exempt addresses)."""
        if identity.startswith(UNLIMITED_PREFIXES) or not self.active:
            return True
        return not address or await self.exempt.contains(address)

    @contextlib.asynccontextmanager
    async def admit(self, method: str, identity: str, address: str) -> AsyncIterator[None]:
        """Count one call of ``method``; RateLimited if over a limit. Uploads hold a lease until the block ends."""
        if await self.unlimited(identity, address):
            yield
            return
        await self.check_rate(identity, address)
        lease: Lease | None = None
        if method in self.upload_methods:
            lease = await self.acquire_upload(identity, address)
        try:
            yield
        finally:
            if lease is not None:
                await lease.release()

    # -- rate -------------------------------------------------------------------------------------

    async def check_rate(self, identity: str, address: str) -> None:
        """Take a token from the identity's and the address's buckets, or raise RateLimited."""
        lim = self.limits
        buckets: list[tuple[str, float, int, str]] = []
        if identity and lim.rate_per_identity > 0:
            who = f"identity {identity}"
            buckets.append((f"{KEY_PREFIX}rate:id:{identity}", lim.rate_per_identity, lim.burst_per_identity, who))
        if address and lim.rate_per_address > 0:
            key = address_key(address)
            who = f"address {key}"
            buckets.append((f"{KEY_PREFIX}rate:addr:{key}", lim.rate_per_address, lim.burst_per_address, who))
        if not buckets:
            return
        args: list[float | int] = []
        for _, rate, burst, _ in buckets:
            args += [rate, burst]
        reply = await self._run("rate", _RATE_LUA, [b[0] for b in buckets], args)
        if not reply:
            return
        wait_ms, which = int(reply[0]), int(reply[1])
        if wait_ms > 0:
            _, rate, _, who = buckets[which - 1]
            seconds = max(1, math.ceil(wait_ms / 1000))
            raise errors.RateLimited(
                f"too many requests from {who} (limit {rate:g} per second); retry in {seconds} s", seconds
            )

    # -- concurrent uploads ---------------------------------------------------------------------------

    async def acquire_upload(self, identity: str, address: str) -> Lease | None:
        """A lease on one concurrent upload of the identity and the address, or RateLimited."""
        lim = self.limits
        sets: list[tuple[str, int, str]] = []
        if identity and lim.uploads_per_identity > 0:
            sets.append((f"{KEY_PREFIX}uploads:id:{identity}", lim.uploads_per_identity, f"identity {identity}"))
        if address and lim.uploads_per_address > 0:
            key = address_key(address)
            sets.append((f"{KEY_PREFIX}uploads:addr:{key}", lim.uploads_per_address, f"address {key}"))
        if not sets:
            return None
        token = secrets.token_hex(8)
        keys = [s[0] for s in sets]
        reply = await self._run("acquire", _ACQUIRE_LUA, keys, [token, int(LEASE_TTL * 1000), *(s[1] for s in sets)])
        if reply is None:
            return None  # Redis is down: not limited
        if int(reply):
            _, limit, who = sets[int(reply) - 1]
            raise errors.RateLimited(
                f"too many uploads at once from {who} (limit {limit}); retry in {UPLOAD_RETRY_AFTER} s",
                UPLOAD_RETRY_AFTER,
            )
        return Lease(self, keys, token)

    # -- redis ------------------------------------------------------------------------------------------

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = aioredis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        return self._redis

    async def _run(self, name: str, lua: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script; None (and no limit) while Redis is unreachable."""
        if time.monotonic() < self._down_until:
            return None
        try:
            script = self._scripts.get(name)
            if script is None:
                script = self._scripts[name] = self._client().register_script(lua)
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self._down_until = time.monotonic() + REDIS_COOLDOWN
            if time.monotonic() - self._logged_at > LOG_EVERY:
                self._logged_at = time.monotonic()
                log.warning("limits are off while redis (%s) cannot be reached: %s", self.redis_url, exc)
            return None

    async def close(self) -> None:
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except (RedisError, OSError) as exc:
                log.debug("closing the limits' redis client: %s", exc)
            self._redis = None
            self._scripts.clear()


class Lease:
    """One running upload, counted in Redis until ``release``; refreshed in the background meanwhile."""

    def __init__(self, limiter: Limiter, keys: list[str], token: str) -> None:
        self.limiter = limiter
        self.keys = keys
        self.token = token
        self._task = asyncio.create_task(self._refresh(), name="limits-lease")

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(LEASE_TTL / 3)
            await self.limiter._run("refresh", _REFRESH_LUA, self.keys, [self.token, int(LEASE_TTL * 1000)])

    async def release(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if time.monotonic() < self.limiter._down_until:
            return
        try:
            client = self.limiter._client()
            async with client.pipeline(transaction=False) as pipe:
                for key in self.keys:
                    pipe.zrem(key, self.token)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not release an upload lease (it expires in %g s): %s", LEASE_TTL, exc)


async def idle_timeout(items: AsyncIterator[T], seconds: float, what: str = "upload") -> AsyncIterator[T]:
    """``items`` as they come; TimedOut when none arrives for ``seconds`` (a client that stopped sending).

    The clock runs only while the next item is awaited, not while the caller works on one. One
    timeout for the whole stream, moved at each item (no task and timer per item: an upload is
    hundreds of messages).
    """
    it = aiter(items)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(None) as clock:
            while True:
                clock.reschedule(loop.time() + seconds)
                try:
                    item = await anext(it)
                except StopAsyncIteration:
                    return
                if clock.expired():  # it came as the clock ran out: the task is being cancelled
                    raise TimeoutError
                clock.reschedule(None)
                yield item
    except TimeoutError:
        raise errors.TimedOut(
            f"the {what} stalled: nothing arrived for {seconds:g} s, so it was dropped; send it again"
        ) from None
