"""The in-memory index of a dir backend: key -> (segment, offset, length, order), rebuilt from index.log.

Each process keeps the whole index in memory, like 0-db: 16 bytes per id ever
issued in seq mode (arrays), a dict entry per key in user mode.
"""

from __future__ import annotations

import bisect
from array import array
from typing import Final

from services.common.backends.base import SEQ_KEY_SIZE, Mode, seq_key

__all__ = ["Entry", "SeqIndex", "UserIndex", "new_index"]

#: (segment, offset, length, order)
Entry = tuple[int, int, int, int]

ABSENT: Final = 0xFFFFFFFF
MAX_ID_GAP: Final = 1 << 32


class SeqIndex:
    """Seq mode: arrays indexed by id, 16 bytes per id ever issued (a dict would take ~10x that)."""

    __slots__ = ("count", "offs", "segs", "sizes")

    def __init__(self) -> None:
        self.segs = array("I")
        self.offs = array("Q")
        self.sizes = array("I")  # ABSENT: never stored, or deleted
        self.count = 0

    def get(self, key: bytes) -> Entry | None:
        if len(key) != SEQ_KEY_SIZE:
            return None
        i = int.from_bytes(key, "little")
        if i >= len(self.sizes) or (size := self.sizes[i]) == ABSENT:
            return None
        return self.segs[i], self.offs[i], size, i

    def store(self, key: bytes, seg: int, off: int, length: int, order: int) -> Entry | None:
        """Record key -> (seg, off, length); return the replaced entry."""
        if len(key) != SEQ_KEY_SIZE:
            return None  # cannot happen through this module; ignored rather than trusted
        i = int.from_bytes(key, "little")
        have = len(self.sizes)
        if i == have:  # the common case: the next id
            self.segs.append(seg)
            self.offs.append(off)
            self.sizes.append(length)
            self.count += 1
            return None
        if i > have:
            if i - have > MAX_ID_GAP:
                raise ValueError(f"index record for id {i} is far beyond the last id {have - 1}")
            grow = i + 1 - have
            self.segs.extend(array("I", [0]) * grow)
            self.offs.extend(array("Q", [0]) * grow)
            self.sizes.extend(array("I", [ABSENT]) * grow)
        old = self.sizes[i]
        replaced = (self.segs[i], self.offs[i], old, i)
        self.segs[i], self.offs[i], self.sizes[i] = seg, off, length
        if old == ABSENT:
            self.count += 1
            return None
        return replaced

    def remove(self, key: bytes) -> Entry | None:
        """Forget ``key``; return its entry (None: it was not stored)."""
        entry = self.get(key)
        if entry is None:
            return None
        self.sizes[entry[3]] = ABSENT
        self.count -= 1
        return entry

    def cursor(self, after: bytes) -> int | None:
        """Where a scan resumes after ``after`` (None: it cannot)."""
        return int.from_bytes(after, "little") if len(after) == SEQ_KEY_SIZE else None

    def batch(self, cursor: int, n: int) -> tuple[list[bytes], int | None]:
        """Up to ``n`` stored keys after ``cursor``, and the cursor to go on from (None: the end)."""
        keys: list[bytes] = []
        sizes = self.sizes
        end = len(sizes)
        i = max(cursor + 1, 0)
        while i < end and len(keys) < n:
            if sizes[i] != ABSENT:
                keys.append(seq_key(i))
            i += 1
        return keys, (i - 1 if i < end else None)

    def live(self) -> list[tuple[bytes, Entry]]:
        """Every stored key with its entry, in write order."""
        return [
            (seq_key(i), (self.segs[i], self.offs[i], size, i)) for i, size in enumerate(self.sizes) if size != ABSENT
        ]

    def in_segments(self, wanted: set[int]) -> dict[int, list[bytes]]:
        """The stored keys with a value in one of the segments ``wanted``, per segment."""
        out: dict[int, list[bytes]] = {n: [] for n in wanted}
        segs, sizes = self.segs, self.sizes
        for i, seg in enumerate(segs):
            if seg in wanted and sizes[i] not in (ABSENT, 0):
                out[seg].append(seq_key(i))
        return out


class UserIndex:
    """User mode: a dict, plus the write order (with stale items, pruned now and then) for scan."""

    __slots__ = ("entries", "keys", "orders", "stale")

    def __init__(self) -> None:
        self.entries: dict[bytes, Entry] = {}
        self.orders: list[int] = []  # ascending
        self.keys: list[bytes] = []
        self.stale = 0

    @property
    def count(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> Entry | None:
        return self.entries.get(key)

    def store(self, key: bytes, seg: int, off: int, length: int, order: int) -> Entry | None:
        old = self.entries.get(key)
        self.entries[key] = (seg, off, length, order)
        if old is None or old[3] != order:
            if old is not None:
                self._stale()
            if self.orders and order < self.orders[-1]:
                i = bisect.bisect_right(self.orders, order)
                self.orders.insert(i, order)
                self.keys.insert(i, key)
            else:
                self.orders.append(order)
                self.keys.append(key)
        return old

    def remove(self, key: bytes) -> Entry | None:
        old = self.entries.pop(key, None)
        if old is None:
            return None
        self._stale()
        return old

    def _stale(self) -> None:
        self.stale += 1
        if self.stale > 4096 and self.stale > len(self.entries):
            pairs = [
                (o, k)
                for o, k in zip(self.orders, self.keys, strict=True)
                if (e := self.entries.get(k)) is not None and e[3] == o
            ]
            self.orders = [o for o, _ in pairs]
            self.keys = [k for _, k in pairs]
            self.stale = 0

    def cursor(self, after: bytes) -> int | None:
        entry = self.entries.get(after)
        return None if entry is None else entry[3]

    def batch(self, cursor: int, n: int) -> tuple[list[bytes], int | None]:
        keys: list[bytes] = []
        i = bisect.bisect_right(self.orders, cursor)
        end = len(self.orders)
        while i < end and len(keys) < n:
            order, key = self.orders[i], self.keys[i]
            entry = self.entries.get(key)
            if entry is not None and entry[3] == order:
                keys.append(key)
            cursor = order
            i += 1
        return keys, (cursor if i < end else None)

    def live(self) -> list[tuple[bytes, Entry]]:
        return sorted(self.entries.items(), key=lambda item: item[1][3])

    def in_segments(self, wanted: set[int]) -> dict[int, list[bytes]]:
        out: dict[int, list[bytes]] = {n: [] for n in wanted}
        for key, (seg, _, length, _) in self.entries.items():
            if seg in wanted and length:
                out[seg].append(key)
        return out


def new_index(mode: Mode) -> SeqIndex | UserIndex:
    """An empty index for a backend in ``mode``."""
    return SeqIndex() if mode is Mode.SEQ else UserIndex()
