"""``file_source(once=True)``: a file read once leaves the page cache as it is read (``read_once``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

from services.common.engine import file_source

PAGE = mmap.PAGESIZE


def resident_pages(path: Path) -> list[bool]:
    """Which pages of ``path`` are in the page cache (mincore over a private mapping of it)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return [bool(v & 1) for v in vec]


async def _read_all(path: Path, once: bool) -> bytes:
    return b"".join([piece async for piece in file_source(path, block=64 * PAGE, once=once)])


async def test_a_file_read_once_leaves_the_cache_behind_it(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    data = os.urandom(256 * PAGE)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages: the kernel may drop them
    finally:
        os.close(fd)
    assert all(resident_pages(path))
    assert await _read_all(path, once=False) == data
    assert all(resident_pages(path))  # a plain read keeps them
    assert await _read_all(path, once=True) == data
    resident = resident_pages(path)
    assert not any(resident[:192]), "pages before the last block are dropped"
