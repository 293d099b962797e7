"""The backend pool's circuit breakers over real dir backends (a folder moved away is a backend down).

The clock is the test's own, so the breaker's waits pass without sleeping.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common import readiness
from services.common.backends import Mode, open_backend
from services.common.backends.pool import FIRST_RETRY, SLOW_STRIKES, BackendPool, State
from services.common.errors import BackendUnavailable, KeyNotFound, NamespaceFull


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[tuple[BackendPool, Clock, Path]]:
    clock = Clock()
    backends = {f"b{i}": await open_backend(f"dir://{tmp_path}/b{i}", Mode.SEQ) for i in range(3)}
    p = BackendPool(backends, cooldown=8.0, clock=clock)
    yield p, clock, tmp_path
    await p.close()


async def test_an_outage_opens_a_probe_closes(pool: tuple[BackendPool, Clock, Path]) -> None:
    p, clock, root = pool
    shutil.move(root / "b1", root / "b1-away")
    with pytest.raises(BackendUnavailable) as caught:
        await p.backends["b1"].get(b"\0" * 8)
    p.failed("b1", caught.value)
    assert p.states() == {"b0": "closed", "b1": "open", "b2": "closed"}
    assert not p.usable("b1") and p.healthy() == ["b0", "b2"] and not p.writable("b1")

    clock.now += FIRST_RETRY  # due: the next look starts a probe in the background; callers are still refused
    assert not p.usable("b1") and p.breaker("b1").state is State.HALF_OPEN
    await p.wait_probes()
    assert p.breaker("b1").state is State.OPEN, "the folder is still away"
    assert p.breaker("b1").wait == 2 * FIRST_RETRY, "each failed probe doubles the wait"
    for _ in range(5):
        clock.now += p.breaker("b1").wait
        p.usable("b1")
        await p.wait_probes()
    assert p.breaker("b1").wait == 8.0, "up to backend_cooldown"

    shutil.move(root / "b1-away", root / "b1")
    generation = p.generation
    clock.now += p.breaker("b1").wait
    assert not p.usable("b1")
    await p.wait_probes()
    assert p.usable("b1") and p.generation == generation + 1  # a backend came back: the repair queue looks
    assert p.breaker("b1").opened == 1 and p.down_for("b1") == 0.0


async def test_answers_that_are_not_outages_keep_it_closed(pool: tuple[BackendPool, Clock, Path]) -> None:
    p, clock, _ = pool
    p.failed("b0", KeyNotFound("b0", "no such key"))
    assert p.usable("b0")
    p.refused_write("b2", NamespaceFull("b2", "full"))  # reads go on; no new shards for cooldown seconds
    assert p.usable("b2") and not p.writable("b2")
    clock.now += 8.0
    assert p.writable("b2")
    p.failed("b0", TimeoutError())  # silence is an outage
    assert not p.usable("b0") and "no answer" in p.breaker("b0").reason


async def test_reads_that_keep_missing_the_hedge_open_it(pool: tuple[BackendPool, Clock, Path]) -> None:
    p, _, _ = pool
    for _ in range(SLOW_STRIKES - 1):
        p.slow("b2")
    p.succeeded("b2")  # an answer in between: it was slow, not hung
    for _ in range(SLOW_STRIKES - 1):
        p.slow("b2")
    assert p.usable("b2")
    p.slow("b2")
    assert not p.usable("b2") and "hung" in p.breaker("b2").reason


async def test_readiness_probes_through_the_breakers(pool: tuple[BackendPool, Clock, Path]) -> None:
    p, clock, root = pool
    assert (await readiness.backends(p, 3)).serving
    shutil.move(root / "b0", root / "b0-away")
    ready = await readiness.backends(p, 3)  # the probe finds it gone while nobody used it
    assert not ready.serving and "2 of 3 shard backends answer; 3 are needed" in ready.reason
    assert "b0 (" in ready.reason and p.breaker("b0").state is State.OPEN
    shutil.move(root / "b0-away", root / "b0")
    assert not (await readiness.backends(p, 3)).serving, "an open breaker is not asked before its time"
    clock.now += FIRST_RETRY
    assert (await readiness.backends(p, 3)).serving
