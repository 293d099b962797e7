"""Backend URIs: parse, validate, redact.

* ``dir:///abs/path`` or ``dir://relative/path`` - a folder on this machine.
* ``zdb://[:password@]host:port/namespace`` - a 0-db namespace. IPv6 hosts go
  in brackets (``zdb://[::1]:9900/ns``). The password is the namespace's.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field

from services.common.errors import InvalidURI

_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True)
class DirURI:
    path: str

    @property
    def redacted(self) -> str:
        return f"dir://{self.path}"


@dataclass(frozen=True)
class ZdbURI:
    host: str
    port: int
    namespace: str
    password: str | None = field(default=None, repr=False)

    @property
    def redacted(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        auth = ":***@" if self.password else ""
        return f"zdb://{auth}{host}:{self.port}/{self.namespace}"


BackendURI = DirURI | ZdbURI


def parse_uri(uri: str) -> BackendURI:
    """Parse a backend URI or raise InvalidURI naming what is wrong."""
    if not isinstance(uri, str) or not uri:
        raise InvalidURI("backend URI is empty")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise InvalidURI(f"backend URI {_safe(uri)!r} has no scheme; use dir:///path or zdb://host:port/namespace")
    scheme = scheme.lower()
    if scheme == "dir":
        path = urllib.parse.unquote(rest)
        if not path or path == "/":
            raise InvalidURI(f"backend URI {uri!r} names no folder")
        if "\x00" in path:
            raise InvalidURI("backend URI folder contains a NUL byte")
        return DirURI(path=path)
    if scheme == "zdb":
        return _parse_zdb(uri)
    raise InvalidURI(f"backend URI {_safe(uri)!r}: unknown scheme {scheme!r} (expected dir or zdb)")


def _parse_zdb(uri: str) -> ZdbURI:
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise InvalidURI(f"backend URI {_safe(uri)!r}: {exc}") from None
    if parts.query or parts.fragment:
        raise InvalidURI(f"backend URI {_safe(uri)!r}: query strings and fragments are not allowed")
    host = parts.hostname
    if not host:
        raise InvalidURI(f"backend URI {_safe(uri)!r} names no host")
    if port is None:
        raise InvalidURI(f"backend URI {_safe(uri)!r} names no port (zdb://host:port/namespace)")
    if parts.username:
        raise InvalidURI(f"backend URI {_safe(uri)!r}: 0-db has no user names; write zdb://:password@host:port/ns")
    namespace = parts.path.lstrip("/")
    if not namespace:
        raise InvalidURI(f"backend URI {_safe(uri)!r} names no namespace (zdb://host:port/namespace)")
    if not _NAMESPACE.match(namespace) or namespace in {".", ".."}:
        raise InvalidURI(
            f"backend URI {_safe(uri)!r}: namespace {namespace!r} must be 1-128 of letters, digits, '_', '.', '-'"
        )
    if namespace == "default":
        raise InvalidURI(f"backend URI {_safe(uri)!r}: the 'default' namespace cannot hold gridstor data")
    password = urllib.parse.unquote(parts.password) if parts.password else None
    return ZdbURI(host=host, port=port, namespace=namespace, password=password)


def _safe(uri: str) -> str:
    """The URI with any password masked, for error messages."""
    return re.sub(r"(://[^/@]*:)[^/@]*@", r"\1***@", uri)
