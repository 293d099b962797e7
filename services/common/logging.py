"""Structured logs: one JSON object per line on stderr, with secrets kept out.

Each line is ``{"ts", "level", "service", "logger", "msg", ...}`` plus every
field passed with ``extra=``, e.g. ``log.info("token issued", extra={"identity": who})``.

Secrets stay out of the log even when a caller slips:

* fields named like a secret (``secret``, ``password``, ``token``, ``signature``,
  ``authorization``, ``*_key`` of private keys ...) are written as ``<redacted>``;
* bytes are written as their length only (key material is bytes), and PyNaCl
  objects as their type name (``str(SigningKey)`` is the raw private seed);
* bearer tokens (``gs1.…``), ``Bearer …`` headers, passwords in URLs
  (``redis://:pw@host``) and any value given to ``register_secret`` are masked
  in messages, string fields and tracebacks.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

from services.common.errors import InvalidInput

REDACTED = "<redacted>"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_BASE_FIELDS = ("ts", "level", "service", "logger", "msg")
_SECRET_NAMES = re.compile(
    r"(^|_)(secret|password|passwd|token|signature|authorization|private_key|signing_key|master_key|seed)$",
    re.IGNORECASE,
)
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\bgs1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"), "gs1." + REDACTED),
    (re.compile(r"(?i)\b(bearer\s+)\S+"), r"\1" + REDACTED),
    (re.compile(r"(://[^/\s:@]*:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
]
_registered: set[str] = set()


def register_secret(value: str) -> None:
    """Mask this exact value wherever it would appear in a log line (e.g. the shared secret)."""
    if len(value) >= 4:  # masking a 1-3 character string would garble ordinary text
        _registered.add(value)


def scrub(text: str) -> str:
    """``text`` with tokens, bearer headers, URL passwords and registered secrets masked."""
    for value in sorted(_registered, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _safe(value: Any) -> Any:
    """A JSON-friendly, secret-free rendering of one logged value."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if type(value).__module__.startswith("nacl."):
        return f"<{type(value).__name__}>"
    if isinstance(value, Mapping):
        return {str(k): REDACTED if _SECRET_NAMES.search(str(k)) else _safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_safe(v) for v in value]
    return scrub(str(value))


class _Placeholder:
    """Stands in for a %-format argument; the same text under %s and %r."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


def _safe_arg(value: Any) -> Any:
    """A %-format argument with key material replaced (strings are scrubbed after formatting)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return _Placeholder(f"<{len(value)} bytes>")
    if type(value).__module__.startswith("nacl."):
        return _Placeholder(f"<{type(value).__name__}>")
    return value


class JsonFormatter(logging.Formatter):
    """Formats records as single-line JSON objects for ``service``."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def _message(self, record: logging.LogRecord) -> str:
        args = record.args
        if isinstance(args, Mapping):
            args = {k: _safe_arg(v) for k, v in args.items()}
        elif isinstance(args, tuple):
            args = tuple(_safe_arg(v) for v in args)
        msg = str(_safe_arg(record.msg))
        if args:
            try:
                msg = msg % args
            except (TypeError, ValueError):
                msg = f"{msg} {args!r}"  # a bad format string must not lose the line
        return scrub(msg)

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line for ``record``."""
        ts = _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds")
        line: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": self._message(record),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            name = f"extra_{key}" if key in _BASE_FIELDS else key
            line[name] = REDACTED if _SECRET_NAMES.search(key) else _safe(value)
        if record.exc_info:
            line["exc"] = scrub(self.formatException(record.exc_info))
        if record.stack_info:
            line["stack"] = scrub(self.formatStack(record.stack_info))
        return json.dumps(line, ensure_ascii=False, default=str)


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the current ``sys.stderr``; setup_logging replaces an earlier one of these."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` to whatever ``sys.stderr`` is now (it may be swapped after setup)."""
        self.stream = sys.stderr  # handle() holds the handler lock here
        super().emit(record)


def setup_logging(service: str, level: str = "INFO") -> None:
    """Send every log record of this process to stderr as JSON lines tagged with ``service``."""
    name = level.upper()
    if name not in LEVELS:
        raise InvalidInput(f"log level: must be one of {', '.join(LEVELS)}, got {level!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _JsonHandler) or type(h) is logging.StreamHandler]:
        root.removeHandler(old)  # basicConfig's or an earlier setup's plain handler would double each line
    handler = _JsonHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root.addHandler(handler)
    root.setLevel(name)
    logging.captureWarnings(True)
