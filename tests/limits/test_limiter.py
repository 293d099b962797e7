"""services/common/limits.py against a real redis-server: buckets, leases, addresses, a Redis that is down."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common import errors, limits
from services.common.config import LimitsConfig
from services.common.limits import Limiter, address_key, idle_timeout, peer_address
from tests.redis_server import RedisProcess

NONE = {"exempt": (), "rate_per_identity": 0.0, "rate_per_address": 0.0, "uploads_per_identity": 0,
        "uploads_per_address": 0}  # fmt: skip
UPLOAD = "/gridstor.v1.IngestService/Upload"


def limiter(redis: RedisProcess, **kw: object) -> Limiter:
    return Limiter(LimitsConfig(**(NONE | kw)), redis.url)  # type: ignore[arg-type]


async def test_a_bucket_refuses_over_its_burst_and_says_when_to_retry(redis_server: RedisProcess) -> None:
    lim = limiter(redis_server, rate_per_identity=1.0, burst_per_identity=2)
    try:
        for _ in range(2):
            await lim.check_rate("alice", "")
        with pytest.raises(errors.RateLimited) as info:
            await lim.check_rate("alice", "")
        assert info.value.retry_after == 1
        assert str(info.value) == "too many requests from identity alice (limit 1 per second); retry in 1 s"
        await lim.check_rate("bob", "")  # another identity has its own bucket
        # A second process (another Limiter on the same Redis) sees the same bucket.
        other = limiter(redis_server, rate_per_identity=1.0, burst_per_identity=2)
        with pytest.raises(errors.RateLimited):
            await other.check_rate("alice", "")
        await other.close()
    finally:
        await lim.close()


async def test_a_refused_request_consumes_nothing_from_the_other_bucket(redis_server: RedisProcess) -> None:
    lim = limiter(redis_server, rate_per_identity=0.1, burst_per_identity=1, rate_per_address=0.1, burst_per_address=3)
    try:
        await lim.check_rate("alice", "192.0.2.7")
        for _ in range(3):  # alice is empty: refused, and the address keeps its tokens
            with pytest.raises(errors.RateLimited, match=r"identity alice.*retry in 10 s"):
                await lim.check_rate("alice", "192.0.2.7")
        await lim.check_rate("bob", "192.0.2.7")
        await lim.check_rate("carol", "192.0.2.7")
        with pytest.raises(errors.RateLimited, match=r"from address 192\.0\.2\.7 \(limit 0\.1 per second\)"):
            await lim.check_rate("dave", "192.0.2.7")
    finally:
        await lim.close()


async def test_ipv6_clients_count_per_64(redis_server: RedisProcess) -> None:
    assert address_key("2001:db8:1:2::5") == address_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert address_key("::ffff:198.51.100.4") == "198.51.100.4"
    lim = limiter(redis_server, rate_per_address=0.1, burst_per_address=1)
    try:
        await lim.check_rate("", "2001:db8:1:2::5")
        with pytest.raises(errors.RateLimited, match="2001:db8:1:2::/64"):
            await lim.check_rate("", "2001:db8:1:2::6")
        await lim.check_rate("", "2001:db8:1:3::5")
    finally:
        await lim.close()


async def test_concurrent_uploads_hold_leases_until_released(redis_server: RedisProcess) -> None:
    lim = limiter(redis_server, uploads_per_identity=2, uploads_per_address=3)
    try:
        a = await lim.acquire_upload("alice", "192.0.2.1")
        b = await lim.acquire_upload("alice", "192.0.2.1")
        with pytest.raises(errors.RateLimited) as info:
            await lim.acquire_upload("alice", "192.0.2.1")
        assert info.value.retry_after == limits.UPLOAD_RETRY_AFTER
        assert str(info.value) == "too many uploads at once from identity alice (limit 2); retry in 5 s"
        c = await lim.acquire_upload("bob", "192.0.2.1")
        with pytest.raises(errors.RateLimited, match=r"from address 192\.0\.2\.1 \(limit 3\)"):
            await lim.acquire_upload("carol", "192.0.2.1")
        assert a is not None and b is not None and c is not None
        await a.release()
        d = await lim.acquire_upload("alice", "192.0.2.1")
        for lease in (b, c, d):
            assert lease is not None
            await lease.release()
    finally:
        await lim.close()


async def test_a_lease_of_a_dead_process_expires(redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "LEASE_TTL", 0.4)
    lim = limiter(redis_server, uploads_per_identity=1)
    try:
        lease = await lim.acquire_upload("alice", "")
        assert lease is not None
        lease._task.cancel()  # the process "dies": no refresh, no release
        with pytest.raises(errors.RateLimited):
            await lim.acquire_upload("alice", "")
        await asyncio.sleep(0.6)  # the point: the lease's TTL (0.4 s) must pass with nobody refreshing it
        again = await lim.acquire_upload("alice", "")
        assert again is not None
        await again.release()
    finally:
        await lim.close()


async def test_a_running_upload_keeps_its_lease_past_the_ttl(
    redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "LEASE_TTL", 0.3)
    lim = limiter(redis_server, uploads_per_identity=1)
    try:
        async with lim.admit(UPLOAD, "alice", "192.0.2.1"):
            await asyncio.sleep(0.8)  # the point: hold it past the TTL (0.3 s); it is refreshed every TTL/3
            with pytest.raises(errors.RateLimited):
                await lim.acquire_upload("alice", "")
        lease = await lim.acquire_upload("alice", "")  # released when the block ended
        assert lease is not None
        await lease.release()
    finally:
        await lim.close()


async def test_services_operators_exempt_addresses_and_a_dead_redis_are_not_limited(
    tmp_path: Path, redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    lim = Limiter(LimitsConfig(rate_per_address=0.1, burst_per_address=1), redis_server.url)  # default exempt: loopback
    try:
        for _ in range(3):
            async with lim.admit(UPLOAD, "", "127.0.0.1"):
                pass
            async with lim.admit(UPLOAD, "service:ingest", "192.0.2.1"):
                pass
            async with lim.admit(UPLOAD, "admin:op", "192.0.2.1"):
                pass
    finally:
        await lim.close()
    down = Limiter(LimitsConfig(**(NONE | {"rate_per_address": 0.1, "burst_per_address": 1})),  # type: ignore[arg-type]
                   f"unix://{tmp_path}/no-redis.sock")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="services.common.limits"):
        for _ in range(3):
            async with down.admit(UPLOAD, "alice", "192.0.2.1"):
                pass
    assert "limits are off while redis" in caplog.text
    assert caplog.text.count("limits are off") == 1  # logged once, not per call
    await down.close()


async def test_the_client_address_comes_from_envoy_only_when_envoy_is_trusted() -> None:
    assert peer_address("ipv4:192.0.2.1:5050") == "192.0.2.1"
    assert peer_address("ipv6:%5B2001:db8::1%5D:5050") == "2001:db8::1"
    assert peer_address("ipv6:[::1]:5050") == "::1"
    assert peer_address("unix:/tmp/s") == ""
    lim = Limiter(LimitsConfig(trusted_proxies=("10.0.0.0/8", "localhost")), "unix:///nowhere")
    forwarded = [("x-forwarded-for", "6.6.6.6, 198.51.100.9")]
    # From a trusted proxy: the address Envoy saw (x-envoy-external-address), else the last XFF entry.
    assert await lim.client_address("ipv4:10.1.1.1:1", forwarded) == "198.51.100.9"
    both = [*forwarded, ("x-envoy-external-address", "203.0.113.5")]
    assert await lim.client_address("ipv4:10.1.1.1:1", both) == "203.0.113.5"
    assert await lim.client_address("ipv4:127.0.0.1:1", forwarded) == "198.51.100.9"  # localhost resolved
    # Anyone else's forwarded headers are ignored.
    assert await lim.client_address("ipv4:192.0.2.44:1", both) == "192.0.2.44"
    assert await lim.client_address("ipv4:10.1.1.1:1", [("x-forwarded-for", "junk")]) == "10.1.1.1"
    await lim.close()


async def test_idle_timeout_drops_a_stalled_stream() -> None:
    async def stalls() -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(10)  # the point: a stream that stalls past the idle timeout
        yield 2

    got = []
    with pytest.raises(errors.TimedOut, match=r"the upload stalled: nothing arrived for 0.2 s"):
        async for item in idle_timeout(stalls(), 0.2):
            got.append(item)
    assert got == [1]

    async def flows() -> AsyncIterator[int]:
        for i in range(5):
            await asyncio.sleep(0.05)  # a slow but steady stream: each gap well inside the idle timeout
            yield i

    assert [i async for i in idle_timeout(flows(), 0.2)] == [0, 1, 2, 3, 4]
