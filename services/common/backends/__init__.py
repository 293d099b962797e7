"""Storage backends: one interface (``base.Backend``), two drivers (dir, zdb)."""

from __future__ import annotations

from services.common.backends.base import Backend, BackendInfo, Mode, put_each
from services.common.backends.uri import DirURI, ZdbURI, parse_uri

__all__ = ["Backend", "BackendInfo", "Mode", "open_backend", "parse_uri", "put_each"]


async def open_backend(uri: str, mode: Mode, *, marked: bool = False) -> Backend:
    """Open the backend a URI names, in ``mode``; InvalidURI / BackendError say why not.

    ``marked``: a shard backend, whose identity marker is read (0-db: written into an empty
    namespace); dir backends always carry one (meta.json).
    """
    parsed = parse_uri(uri)
    if isinstance(parsed, DirURI):
        from services.common.backends.dirstore import DirBackend

        return await DirBackend.open(parsed, mode)
    assert isinstance(parsed, ZdbURI)
    from services.common.backends.zdb import ZdbBackend

    return await ZdbBackend.open(parsed, mode, marked=marked)
