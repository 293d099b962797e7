"""``put_each``: one value into each of several backends, each driver class writing its share its own way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import ClassVar, Self

import pytest

from services.common import errors
from services.common.backends import put_each
from services.common.backends.base import Backend, BackendInfo, Mode, seq_key
from services.common.backends.dirstore import DirBackend
from services.common.backends.lazy import LazyBackend
from services.common.backends.uri import DirURI


class CountingDir(DirBackend):
    """A dir backend that records the batches its class was given."""

    batches: ClassVar[list[int]] = []

    @classmethod
    async def put_batch(
        cls, items: Sequence[tuple[Self, bytes]], put_timeout: float | None = None
    ) -> list[bytes | errors.BackendError]:
        cls.batches.append(len(items))
        return await super().put_batch(items, put_timeout)


class Stalled(Backend):
    """A backend whose puts never answer (a hung server); ``put_batch`` is the base class's."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = Mode.SEQ

    async def put(self, value: bytes) -> bytes:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def set(self, key: bytes, value: bytes) -> None:
        raise NotImplementedError

    async def get(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    async def exists(self, key: bytes) -> bool:
        raise NotImplementedError

    async def delete(self, key: bytes) -> None:
        raise NotImplementedError

    async def scan(self, after: bytes | None = None) -> AsyncIterator[bytes]:
        raise NotImplementedError
        yield b""

    async def info(self) -> BackendInfo:
        raise NotImplementedError

    async def close(self) -> None:
        pass


async def _open(path: Path) -> CountingDir:
    backend = await CountingDir.open(DirURI(str(path)), Mode.SEQ, fsync="never")
    assert isinstance(backend, CountingDir)
    return backend


async def test_each_driver_class_writes_its_share_in_one_batch(tmp_path: Path) -> None:
    CountingDir.batches = []
    a, b = await _open(tmp_path / "a"), await _open(tmp_path / "b")
    opened = LazyBackend("lazy-up", Mode.SEQ, lambda: _open(tmp_path / "c"), errors.BackendUnavailable("c", "x"), 0)
    down = LazyBackend("lazy-down", Mode.SEQ, lambda: _open(tmp_path / "no" / "d"), errors.BackendUnavailable("d", "x"))
    assert not await opened.exists(seq_key(0))  # opens it
    assert opened.batch_target() is not opened and down.batch_target() is down
    stalled = Stalled("stalled")

    results = await put_each(
        [(a, b"to a"), (stalled, b"lost"), (opened, b"to c"), (down, b"refused"), (b, b"to b")], put_timeout=0.01
    )

    assert CountingDir.batches == [3]  # a, b and the opened lazy backend: one batch, one worker thread
    assert results[0] == results[2] == results[4] == seq_key(0)
    assert isinstance(results[1], errors.BackendUnavailable) and "no answer within 0.01 s" in str(results[1])
    assert isinstance(results[3], errors.BackendUnavailable) and "unreachable since" in str(results[3])
    assert [await x.get(seq_key(0)) for x in (a, opened, b)] == [b"to a", b"to c", b"to b"]
    for backend in (a, b, opened, down):
        await backend.close()


async def test_caller_errors_raise_before_any_write(tmp_path: Path) -> None:
    a = await _open(tmp_path / "a")
    user = await DirBackend.open(DirURI(str(tmp_path / "u")), Mode.USER, fsync="never")
    with pytest.raises(errors.InvalidInput, match="needs a seq backend"):
        await put_each([(a, b"x"), (Stalled("s"), b"y"), (user, b"z")])
    assert [k async for k in a.scan()] == []
    await a.close()
    await user.close()
