"""Prometheus metrics without a client library: counters, gauges, an HTTP endpoint.

Each service process has one ``Registry``; ``serve_metrics`` answers
``GET /metrics`` in the Prometheus text format (0.0.4).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_module
import threading
from typing import TypeVar

Labels = tuple[tuple[str, str], ...]


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + inner + "}"


def _fmt_value(v: float) -> str:
    """Exact text for a sample: byte counters must not be rounded to 6 digits as ``:g`` does."""
    f = float(v)
    return str(int(f)) if f.is_integer() and abs(f) < 2**53 else repr(f)


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        return tuple(sorted(labels.items()))

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            items = sorted(self._values.items()) or [((), 0.0)]
        lines += [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in items]
        return lines


class Counter(Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(Metric):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[self._key(labels)] = value

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


_M = TypeVar("_M", bound=Metric)


class Registry:
    def __init__(self, prefix: str = "gridstor") -> None:
        self.prefix = prefix
        self._metrics: dict[str, Metric] = {}

    def counter(self, name: str, help_text: str) -> Counter:
        return self._add(Counter(f"{self.prefix}_{name}", help_text))

    def gauge(self, name: str, help_text: str) -> Gauge:
        return self._add(Gauge(f"{self.prefix}_{name}", help_text))

    def _add(self, metric: _M) -> _M:
        existing = self._metrics.get(metric.name)
        if isinstance(existing, type(metric)):
            return existing
        assert existing is None, f"metric {metric.name} registered twice with different kinds"
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics.values():
            lines += m.render()
        return "\n".join(lines) + "\n"


async def serve_metrics(
    registry: Registry, host: str, port: int, *, ssl: ssl_module.SSLContext | None = None
) -> asyncio.Server:
    """A minimal HTTP/1.0 server: GET /metrics -> text format, anything else 404 (HTTPS with ``ssl``)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body = registry.render().encode()
                head = "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            else:
                body = b"not found: try GET /metrics\n"
                head = "HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):  # the client left first (reset, TLS cut short): nothing to tell
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, ssl=ssl)
