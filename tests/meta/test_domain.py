"""Meta's grpc-free helpers: message re-slicing, per-hash locks, content types and dispositions."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from services.common.mime import content_disposition, content_type_for, is_active, safe_filename, type_for_ext
from services.meta.catalog import KeyedLocks
from services.meta.download import reslice

SIZE = 1000


async def feed(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for p in pieces:
        yield p


async def cut(pieces: list[bytes], size: int = SIZE) -> list[bytes]:
    return [m async for m in reslice(feed(pieces), size)]


@pytest.mark.parametrize(
    "lengths",
    [[], [0], [1], [SIZE], [SIZE - 1, 1], [4 * SIZE], [4 * SIZE + 7], [300] * 11, [1, 2 * SIZE, 3, SIZE, 999]],
)
async def test_reslice_gives_whole_messages(lengths: list[int]) -> None:
    pieces = [os.urandom(n) for n in lengths]
    out = await cut(pieces)
    data = b"".join(pieces)
    assert b"".join(out) == data
    assert all(len(m) == SIZE for m in out[:-1])
    assert all(0 < len(m) <= SIZE for m in out)
    assert len(out) == -(-len(data) // SIZE)
    assert all(type(m) is bytes for m in out)


async def test_reslice_passes_whole_messages_through_uncopied() -> None:
    piece = os.urandom(SIZE)
    out = await cut([piece, piece])
    assert out[0] is piece
    assert out[1] is piece


async def test_reslice_closes_its_source() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * SIZE
        finally:
            closed.set()

    gen = reslice(source(), SIZE)
    assert await anext(gen) == b"x" * SIZE
    await gen.aclose()
    assert closed.is_set()


async def test_keyed_locks_serialize_one_key_and_are_dropped() -> None:
    locks = KeyedLocks()
    inside: list[str] = []
    active = {b"a": 0, b"b": 0}
    peak = {b"a": 0, b"b": 0}

    async def work(key: bytes, tag: str) -> None:
        async with locks.hold(key):
            active[key] += 1
            peak[key] = max(peak[key], active[key])
            inside.append(tag)
            await asyncio.sleep(0)  # yield inside the lock: another task of the same key would get in now
            active[key] -= 1

    await asyncio.gather(*(work(b"a", f"a{i}") for i in range(5)), *(work(b"b", f"b{i}") for i in range(5)))
    assert peak == {b"a": 1, b"b": 1}
    assert len(inside) == 10
    assert len(locks) == 0


async def test_keyed_locks_release_on_error() -> None:
    locks = KeyedLocks()
    with pytest.raises(RuntimeError):
        async with locks.hold(b"k"):
            raise RuntimeError("boom")
    assert len(locks) == 0
    async with locks.hold(b"k"):
        pass


@pytest.mark.parametrize(
    ("ext", "expected"),
    [
        ("", "application/octet-stream"),
        (".jpg", "image/jpeg"),
        (".png", "image/png"),
        (".pdf", "application/pdf"),
        (".json", "application/json"),
        (".tar.gz", "application/gzip"),
        (".gz", "application/gzip"),
        (".tar.bz2", "application/x-bzip2"),
        (".tar.xz", "application/x-xz"),
        (".tar", "application/x-tar"),
        (".nosuchext", "application/octet-stream"),
    ],
)
def test_type_for_ext(ext: str, expected: str) -> None:
    assert type_for_ext(ext) == expected


def test_content_type_for_checks_the_given_type() -> None:
    assert content_type_for("image/webp", ".jpg") == "image/webp"
    assert content_type_for("  text/csv ", "") == "text/csv"
    assert content_type_for("", ".jpg") == "image/jpeg"
    assert content_type_for("text/plain\r\nset-cookie: x", ".txt") == "text/plain"
    assert content_type_for("garbage", "") == "application/octet-stream"
    assert content_type_for("a/" + "b" * 300, "") == "application/octet-stream"


def test_is_active() -> None:
    assert is_active("text/html")
    assert is_active("Text/HTML; charset=utf-8")
    assert is_active("image/svg+xml")
    assert not is_active("image/png")
    assert not is_active("text/plain")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", "DEFAULT"),
        ("photo.jpg", "photo.jpg"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\x\\evil.exe", "evil.exe"),
        ("..", "DEFAULT"),
        (".hidden", "hidden"),
        ("a\x00b\nc.txt", "abc.txt"),
        ("  spaced  ", "spaced"),
        ("x" * 300 + ".mp4", "x" * 196 + ".mp4"),
    ],
)
def test_safe_filename(name: str, expected: str) -> None:
    assert safe_filename(name, "DEFAULT") == expected


def test_content_disposition() -> None:
    assert content_disposition("a.txt", attachment=False) == 'inline; filename="a.txt"'
    assert content_disposition("a.txt", attachment=True) == 'attachment; filename="a.txt"'
    assert content_disposition("café menu.pdf", attachment=True) == (
        "attachment; filename=\"cafe menu.pdf\"; filename*=UTF-8''caf%C3%A9%20menu.pdf"
    )
    assert content_disposition("日本.txt", attachment=False) == (
        "inline; filename=\"__.txt\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.txt"
    )
    value = content_disposition('q"u;o\\te%.txt', attachment=False)
    assert value.startswith('inline; filename="q_u_o_te_.txt"; filename*=')
    assert value.isascii()
