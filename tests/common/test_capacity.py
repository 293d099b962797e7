"""Per-process caps (services/common/capacity.py): slots, waiting, Busy, the read-ahead share, memory release."""

from __future__ import annotations

import asyncio

import pytest

from services.common import errors, tuning
from services.common.capacity import Gate, read_ahead
from tests.helpers import wait_until_async

MiB = 1024 * 1024


async def test_a_gate_admits_its_limit_and_queues_the_rest() -> None:
    gate = Gate("things", 2, wait=30)
    order: list[int] = []
    release = asyncio.Event()

    async def hold(i: int) -> None:
        async with gate.slot():
            order.append(i)
            await release.wait()

    tasks = [asyncio.create_task(hold(i)) for i in range(3)]
    await wait_until_async(lambda: gate.active + gate.waiting, "all three in or waiting", until=lambda n: n == 3)
    assert (gate.active, gate.waiting, order) == (2, 1, [0, 1])
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and (gate.active, gate.waiting) == (0, 0)


async def test_a_full_gate_says_busy_after_its_wait() -> None:
    gate = Gate("downloads in this meta process", 1, wait=0.05)
    async with gate.slot():
        with pytest.raises(errors.Busy) as info:
            async with gate.slot():
                pass
    assert str(info.value).startswith("the gateway is at its limit of 1 concurrent downloads in this meta process")
    assert info.value.retry_after == 1 and gate.waiting == 0
    async with gate.slot():  # free again
        assert gate.active == 1


async def test_no_limit_means_no_waiting() -> None:
    gate = Gate("things", 0, wait=0.01)
    async with gate.slot(), gate.slot(), gate.slot():
        assert gate.active == 3


def test_read_ahead_shares_the_budget() -> None:
    assert read_ahead(32 * MiB, 4 * MiB, 1, 3) == 3  # alone: the configured read-ahead
    assert read_ahead(32 * MiB, 4 * MiB, 4, 3) == 2
    assert read_ahead(32 * MiB, 4 * MiB, 12, 3) == 1  # many: one chunk each, never none
    assert read_ahead(32 * MiB, 256 * 1024, 12, 3) == 3  # small chunks: more fit


def test_release_memory_runs() -> None:
    assert tuning.release_memory() in (True, False)  # glibc: malloc_trim's answer; elsewhere False
