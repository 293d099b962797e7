"""A one-line progress bar on stderr, drawn only when stderr is a terminal (never garbage in pipes or logs)."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

REDRAW_EVERY = 0.1  # seconds


def human(n: float) -> str:
    """Bytes as a short human string: ``512 B``, ``4.0 KiB``, ``12.3 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


class Progress:
    """Counts bytes and redraws ``label [####----] 42% 12.3 MiB / 29.0 MiB 8.1 MiB/s`` now and then."""

    def __init__(
        self, label: str, total: int | None = None, *, stream: TextIO | None = None, enabled: bool | None = None
    ):
        self.stream = stream or sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self._visible = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(ok=exc_type is None)

    def update(self, n: int) -> None:
        """Count ``n`` more bytes."""
        self.done += n
        self._maybe_draw()

    def set(self, done: int, total: int | None = None, label: str | None = None) -> None:
        """Set the position (and the total, or the label) outright."""
        self.done = done
        if total is not None:
            self.total = total
        if label is not None:
            self.label = label
        self._maybe_draw()

    def _maybe_draw(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn >= REDRAW_EVERY:
            self._drawn = now
            self._draw(now)

    def render(self, now: float | None = None) -> str:
        """The bar's text (without the carriage return)."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.started, 1e-6)
        rate = f"{human(self.done / elapsed)}/s"
        width = shutil.get_terminal_size((80, 24)).columns
        if self.total:
            frac = min(self.done / self.total, 1.0)
            tail = f" {frac * 100:3.0f}% {human(self.done)} / {human(self.total)} {rate}"
            room = width - len(self.label) - len(tail) - 4
            bar = ""
            if room >= 10:
                cells = min(room, 40)
                full = int(frac * cells)
                bar = " [" + "#" * full + "-" * (cells - full) + "]"
            line = f"{self.label}{bar}{tail}"
        else:
            line = f"{self.label} {human(self.done)} {rate}"
        return line[: width - 1]

    def _draw(self, now: float) -> None:
        self.stream.write("\r\x1b[K" + self.render(now))
        self.stream.flush()
        self._visible = True

    def close(self, ok: bool = True) -> None:
        """Draw the final state and end the line (ok), or wipe the bar so an error message stands alone."""
        if not self.enabled:
            return
        if ok:
            self._draw(time.monotonic())
            self.stream.write("\n")
        elif self._visible:
            self.stream.write("\r\x1b[K")
        self.stream.flush()
        self._visible = False
