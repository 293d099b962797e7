"""What maint needs from the metadata: read, list, put and compare-and-swap records (no grpc here).

``MetaClient`` (services/common/metaclient.py) implements it over meta's
internal RPCs; tests may pass any object with these methods.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from services.common.engine import FileRecord


@dataclass(frozen=True)
class Entry:
    """A stored record with its metadata id and canonical file id."""

    meta_id: int
    file_id: str
    record: FileRecord


class Records(Protocol):
    """The record operations of meta that maint uses."""

    async def get(self, file_id: str) -> Entry:
        """The record behind a file id (NotFound / InvalidFileId otherwise)."""
        ...

    async def update(self, file_id: str, record: FileRecord, expected: FileRecord) -> None:
        """Replace the record only if the stored one still equals ``expected`` (Conflict otherwise)."""
        ...

    async def put(self, record: FileRecord) -> tuple[Entry, bool]:
        """Store a new record: (entry, deduplicated)."""
        ...

    def list(self, after: int | None = None, limit: int = 0) -> AsyncIterator[Entry]:
        """Records in metadata id order after ``after``; at most ``limit`` (0: all)."""
        ...
