"""Reed-Solomon k+m coding with pyeclib's ISA-L backend (``isa_l_rs_vand``).

The code is systematic: fragments 0..k-1 carry the input in order behind an
80-byte pyeclib header, so a read with every data fragment present joins them
without decoding. Parity fragments are needed only when data fragments are
missing or corrupt.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from pyeclib.ec_iface import ECDriver

from services.common.errors import InvalidInput, Unrecoverable

DEFAULT_EC_TYPE = "isa_l_rs_vand"
FRAGMENT_HEADER = 80
MAX_SHARDS = 32


class Coder:
    """k+m encoder/decoder; thread-safe (one pyeclib driver per thread)."""

    def __init__(self, k: int, m: int, ec_type: str = DEFAULT_EC_TYPE) -> None:
        if k < 1 or m < 1 or k + m > MAX_SHARDS:
            raise InvalidInput(f"erasure code {k}+{m} is not supported: need k >= 1, m >= 1 and k+m <= {MAX_SHARDS}")
        self.k = k
        self.m = m
        self.n = k + m
        self.ec_type = ec_type
        self._local = threading.local()
        self._driver()  # fail early on an unknown ec_type

    def _driver(self) -> ECDriver:
        drv: ECDriver | None = getattr(self._local, "driver", None)
        if drv is None:
            try:
                drv = ECDriver(k=self.k, m=self.m, ec_type=self.ec_type)
            except Exception as exc:  # pyeclib raises its own ECDriverError family
                raise InvalidInput(f"erasure code {self.ec_type} {self.k}+{self.m} unavailable: {exc}") from None
            self._local.driver = drv
        return drv

    def encode(self, data: bytes) -> list[bytes]:
        """Return the k+m fragments of ``data`` (k data first, then m parity)."""
        return list(self._driver().encode(data))

    def join_data(self, fragments: Sequence[bytes], size: int) -> bytes:
        """Rebuild the input from the k data fragments, in order, without decoding."""
        out = b"".join(memoryview(f)[FRAGMENT_HEADER:] for f in fragments[: self.k])
        if len(out) < size:
            raise Unrecoverable(f"data fragments hold {len(out)} bytes, expected {size}")
        return out[:size] if len(out) != size else out

    def decode(self, fragments: Mapping[int, bytes], size: int) -> bytes:
        """Rebuild the input from any k fragments (index -> fragment)."""
        if len(fragments) < self.k:
            raise Unrecoverable(f"{len(fragments)} fragments available, {self.k} needed")
        if all(i in fragments for i in range(self.k)):
            return self.join_data([fragments[i] for i in range(self.k)], size)
        try:
            data = bytes(self._driver().decode(list(fragments.values())))
        except Exception as exc:
            raise Unrecoverable(f"decoding failed: {exc}") from None
        if len(data) != size:
            raise Unrecoverable(f"decoded {len(data)} bytes, expected {size}")
        return data

    def reconstruct(self, fragments: Mapping[int, bytes], missing: Sequence[int]) -> dict[int, bytes]:
        """Rebuild the fragments at ``missing`` from at least k others."""
        if len(fragments) < self.k:
            raise Unrecoverable(f"{len(fragments)} fragments available, {self.k} needed")
        try:
            rebuilt = self._driver().reconstruct(list(fragments.values()), list(missing))
        except Exception as exc:
            raise Unrecoverable(f"reconstruction failed: {exc}") from None
        return dict(zip(missing, (bytes(f) for f in rebuilt), strict=True))

    @staticmethod
    def fragment_index(fragment: bytes) -> int:
        """The index pyeclib wrote in a fragment's header (little-endian u32 at 0)."""
        return int.from_bytes(fragment[:4], "little")
