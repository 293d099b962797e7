"""One setting of the gateway config, defined once: type, default, one-line description, check.

A config section is a frozen dataclass whose fields are made with ``setting()``. The field
holds the default; its metadata holds a ``Setting``: the description, the ``Check`` that
reads (and validates) a YAML value and writes it back, the ``GRIDSTOR_*`` variable that
overrides it, and for a few settings a default derived from the data dir. From these:

* ``read_section`` turns a YAML mapping into the dataclass; every message has the shape
  ``config: engine.k: must be an integer >= 1`` (the section's ``validate()`` adds the
  checks between settings);
* ``dump_section`` writes the dataclass back as plain YAML values that read back equal;
* the default YAML (``make up``) and docs/config.md are rendered from the same fields
  (services/common/config_text.py).

This module knows no section: services/common/config.py and engine.py define them.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from services.common.backends.uri import parse_uri
from services.common.errors import InvalidInput

T = TypeVar("T")
S = TypeVar("S")

SETTING = "gridstor.setting"  # the key of a field's Setting in its dataclass metadata
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class ConfigError(InvalidInput):
    """The configuration is wrong; the message names the field."""


def fail(where: str, problem: str) -> NoReturn:
    """Raise the ConfigError ``config: WHERE: PROBLEM``."""
    raise ConfigError(f"config: {where}: {problem}")


def parse_size(value: object, where: str) -> int:
    """Bytes from an int or a string like ``100MB``, ``4MiB``, ``1.5G``."""
    if isinstance(value, bool):
        fail(where, f"expected a size like 100MB, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "").lower()
        base = 1024 if "i" in unit else 1000
        mult = _UNITS[unit[:1]] if base == 1000 else base ** ("bkmgt".index(unit[0]))
        n = int(float(m.group(1)) * mult)
    else:
        fail(where, f"expected a size like 100MB or 4MiB, got {value!r}")
    if n < 0:
        fail(where, "must not be negative")
    return n


def expect(value: object, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    """``value`` if it is a ``kind`` (a bool is no number); else ConfigError ``expected WHAT``."""
    if isinstance(value, bool) and kind is not bool:
        fail(where, f"expected {what}, got {value!r}")
    if not isinstance(value, kind):
        fail(where, f"expected {what}, got {type(value).__name__} {value!r}")
    return value


@dataclass(frozen=True)
class Context:
    """What reading needs besides the value: the data dir (derived defaults) and the environment."""

    data_dir: Path
    env: Mapping[str, str]


# -- checks ------------------------------------------------------------------------------------------------


class Check:
    """How a setting's YAML value is read (and checked), written back, and named in the docs."""

    kind = "value"  # the type column of docs/config.md

    def read(self, value: object, where: str, ctx: Context) -> Any:
        """The Python value of a YAML ``value``; ConfigError naming ``where``."""
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        """``value`` as plain YAML (str, int, float, bool, None, list, dict) that reads back equal."""
        return value

    def from_env(self, text: str) -> object:
        """The YAML value a ``GRIDSTOR_*`` variable's text stands for."""
        return text


class Int(Check):
    """A whole number within ``lo`` .. ``hi``."""

    def __init__(self, lo: int, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi
        self.kind = f"integer >= {lo}" if hi is None else f"integer {lo}..{hi}"

    def read(self, value: object, where: str, ctx: Context) -> int:
        n = expect(value, int, where, "an integer")
        if n < self.lo or (self.hi is not None and n > self.hi):
            rng = f">= {self.lo}" if self.hi is None else f"between {self.lo} and {self.hi}"
            fail(where, f"must be an integer {rng}, got {n}")
        return int(n)

    def from_env(self, text: str) -> object:
        return int(text) if re.fullmatch(r"\s*-?\d+\s*", text) else text


class Number(Check):
    """A number >= 0 (``positive``: > 0), e.g. seconds or a rate; 0 means ``zero``."""

    def __init__(
        self, what: str = "a number of seconds", *, kind: str = "seconds", positive: bool = False, zero: str = "off"
    ) -> None:
        self.what, self.positive, self.zero = what, positive, zero
        self.kind = f"{kind} {'> 0' if positive else '>= 0'}"

    def read(self, value: object, where: str, ctx: Context) -> float:
        v = expect(value, (int, float), where, self.what)
        if v < 0 or (self.positive and v == 0):
            fail(where, f"must be {'positive' if self.positive else f'>= 0 (0 = {self.zero})'}, got {v}")
        return float(v)


class Size(Check):
    """A byte count: an integer or a string like ``100MB``, ``4MiB``; at least ``lo``."""

    kind = "size (bytes, or 100MB, 4MiB)"

    def __init__(self, lo: int = 0) -> None:
        self.lo = lo

    def read(self, value: object, where: str, ctx: Context) -> int:
        n = parse_size(value, where)
        if n < self.lo:
            fail(where, f"must be more than {self.lo - 1} bytes")
        return n


class Text(Check):
    """A string (``nonempty``: not "")."""

    kind = "string"

    def __init__(self, what: str = "a string", *, nonempty: bool = False) -> None:
        self.what, self.nonempty = what, nonempty

    def read(self, value: object, where: str, ctx: Context) -> str:
        text: str = expect(value, str, where, self.what)
        if self.nonempty and not text.strip():
            fail(where, f"expected {self.what}, got an empty string")
        return text


class Choice(Check):
    """One of a few words."""

    def __init__(self, *options: str) -> None:
        self.options = options
        self.kind = " / ".join(options)

    def read(self, value: object, where: str, ctx: Context) -> str:
        if not isinstance(value, str) or value not in self.options:
            *head, last = self.options
            alts = f"one of {', '.join(self.options)}" if len(head) > 1 else f"{', '.join(head)} or {last}"
            fail(where, f"must be {alts}, got {value!r}")
        return value


class Flag(Check):
    """true or false."""

    kind = "true / false"

    def read(self, value: object, where: str, ctx: Context) -> bool:
        return bool(expect(value, bool, where, "true or false"))


class AutoFlag(Check):
    """true, false, or auto (None: decided from other settings)."""

    kind = "true / false / auto"

    def read(self, value: object, where: str, ctx: Context) -> bool | None:
        if value is None or value == "auto":
            return None
        return bool(expect(value, bool, where, "true, false or auto"))

    def dump(self, value: Any) -> Any:
        return "auto" if value is None else value


class RedisUrl(Check):
    """A redis:// / rediss:// URL or a unix:// socket path."""

    kind = "URL"

    def read(self, value: object, where: str, ctx: Context) -> str:
        url: str = expect(value, str, where, "a redis:// URL")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            fail(where, f"expected redis://host:port/db or unix:///path, got {url!r}")
        return url


class BackendUri(Check):
    """A backend URI: dir:///path or zdb://[:password@]host:port/namespace (``empty_ok``: or "")."""

    def __init__(self, *, empty_ok: bool = False) -> None:
        self.empty_ok = empty_ok
        self.kind = 'backend URI or ""' if empty_ok else "backend URI"

    def read(self, value: object, where: str, ctx: Context) -> str:
        uri: str = expect(value, str, where, "a backend URI")
        if self.empty_ok and not uri:
            return uri
        try:
            parse_uri(uri)
        except InvalidInput as exc:
            fail(where, str(exc))
        return uri


class FilePath(Check):
    """A file path kept as written (relative ones are resolved later against the data dir)."""

    def __init__(self, *, optional: bool = False) -> None:
        self.optional = optional
        self.kind = "file path or null" if optional else "file path"

    def read(self, value: object, where: str, ctx: Context) -> Path | None:
        if value is None and self.optional:
            return None
        text: str = expect(value, str, where, "a file path")
        if not text.strip():
            fail(where, "expected a file path, got an empty string")
        return Path(text).expanduser()

    def dump(self, value: Any) -> Any:
        return None if value is None else str(value)


class Folder(Check):
    """A folder, made absolute: a relative path is inside the data dir (``base="cwd"``: the working dir)."""

    kind = "folder path"

    def __init__(self, *, base: str = "data_dir") -> None:
        self.base = base

    def read(self, value: object, where: str, ctx: Context) -> Path:
        text: str = expect(value, str, where, "a folder path")
        if not text.strip():
            fail(where, "expected a folder path, got an empty string")
        path = Path(text).expanduser()
        return path.absolute() if self.base == "cwd" else ctx.data_dir / path

    def dump(self, value: Any) -> Any:
        return str(value)


class Name(Check):
    """An identity or a backend name: 1-64 of letters, digits, '_', '.', '-'."""

    def __init__(self, what: str = "identity") -> None:
        self.what = self.kind = what

    def read(self, value: object, where: str, ctx: Context) -> str:
        if not isinstance(value, str) or not NAME_RE.match(value):
            fail(where, f"{self.what} must be 1-64 of letters, digits, '_', '.', '-'")
        return value


class HexKey(Check):
    """An ed25519 public key as 64 hex characters (kept in lowercase)."""

    kind = "64 hex characters"

    def read(self, value: object, where: str, ctx: Context) -> str:
        what = "an ed25519 public key as 64 hex characters"
        key: str = expect(value, str, where, what)
        if not re.fullmatch(r"[0-9a-fA-F]{64}", key):
            fail(where, f"expected {what}")
        return key.lower()


class Host(Check):
    """A host name or address to connect to."""

    kind = "host"

    def read(self, value: object, where: str, ctx: Context) -> str:
        host: str = expect(value, str, where, "a host name or address")
        if not host or any(c in host for c in "/ @?#"):
            fail(where, f"{host!r} is not a host name or address")
        return host


class CertName(Check):
    """A DNS name or IP address for a certificate (brackets around IPv6 dropped)."""

    kind = "DNS name or IP"

    def read(self, value: object, where: str, ctx: Context) -> str:
        name: str = expect(value, str, where, "a DNS name or IP address")
        if not re.fullmatch(r"[A-Za-z0-9*_.:-]{1,253}", name.strip("[]")):
            fail(where, f"{name!r} is not a DNS name or IP address")
        return name.strip("[]")


class Address(Check):
    """An IP address, a network (10.0.0.0/8) or a host name."""

    kind = "address, network or host"

    def read(self, value: object, where: str, ctx: Context) -> str:
        text = expect(value, str, where, "an IP address, a network or a host name").strip()
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,253}", text):
                fail(where, f"{text!r} is not an IP address, a network (10.0.0.0/8) or a host name")
        return str(text)


class Service(Check):
    """The name of one of ``services``."""

    kind = "service"

    def __init__(self, services: tuple[str, ...]) -> None:
        self.services = services

    def read(self, value: object, where: str, ctx: Context) -> str:
        if value not in self.services:
            fail(where, f"unknown service; known: {', '.join(self.services)}")
        return str(value)


class ListOf(Check):
    """A list whose items pass ``item`` (a tuple in Python)."""

    def __init__(self, item: Check, what: str) -> None:
        self.item, self.what = item, what
        self.kind = f"list of {item.kind}"

    def read(self, value: object, where: str, ctx: Context) -> tuple[Any, ...]:
        items = expect(value, list, where, self.what)
        return tuple(self.item.read(v, f"{where}[{i}]", ctx) for i, v in enumerate(items))

    def dump(self, value: Any) -> Any:
        return [self.item.dump(v) for v in value]


class MapOf(Check):
    """A mapping whose keys pass ``key`` and values pass ``value``; ``base``: the entries it adds to."""

    def __init__(self, key: Check, value: Check, what: str, base: Mapping[str, Any] | None = None) -> None:
        self.key, self.value, self.what, self.base = key, value, what, base
        self.kind = f"mapping of {key.kind}: {value.kind}"

    def read(self, value: object, where: str, ctx: Context) -> dict[str, Any]:
        raw = expect(value, dict, where, self.what)
        out = dict(self.base or {})
        for k, v in raw.items():
            at = f"{where}.{k}"
            out[self.key.read(k, at, ctx)] = self.value.read(v, at, ctx)
        return out

    def dump(self, value: Any) -> Any:
        return {k: self.value.dump(v) for k, v in value.items()}


class Section(Check):
    """A nested section: a mapping read into the dataclass ``cls``."""

    kind = "section"

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls

    def read(self, value: object, where: str, ctx: Context) -> Any:
        return read_section(self.cls, value, where, ctx)

    def dump(self, value: Any) -> Any:
        return dump_section(value)


# -- settings ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """What a config field means and how it is read: the one definition the rest is derived from."""

    help: str  # one line, for the default YAML and docs/config.md
    check: Check
    env: str = ""  # a GRIDSTOR_* variable that wins over the YAML ("" = none; an empty variable is unset)
    key: str = ""  # the YAML key when it differs from the field name
    # A default computed from the data dir, used when the YAML leaves the key out (or null / "").
    derive: Callable[[Path], Any] | None = None


def setting(
    default: T,
    help: str,
    check: Check,
    *,
    env: str = "",
    key: str = "",
    derive: Callable[[Path], Any] | None = None,
    repr: bool = True,
) -> T:
    """A dataclass field holding ``default`` and its Setting (a dict, list or section gets a factory)."""
    meta = {SETTING: Setting(help, check, env, key, derive)}
    if isinstance(check, Section) or isinstance(default, dict | list | set):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta, repr=repr)
    return dataclasses.field(default=default, metadata=meta, repr=repr)


def section(cls: type[T]) -> T:
    """A field holding the nested section ``cls`` (its defaults); described by the first line of its docstring."""
    doc = inspect.getdoc(cls) or ""
    return setting(cls(), doc.splitlines()[0] if doc else "", Section(cls))


@dataclass(frozen=True)
class Field:
    """One setting of a section as the readers and renderers see it."""

    name: str  # the dataclass field
    key: str  # the YAML key
    setting: Setting
    default: Any  # the dataclass default (before any derivation)

    @property
    def section(self) -> type[Any] | None:
        """The dataclass of a nested section, else None."""
        check = self.setting.check
        return check.cls if isinstance(check, Section) else None


def fields_of(cls: type[Any]) -> list[Field]:
    """Every setting of the section ``cls`` in order; TypeError for a field made without ``setting()``."""
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(SETTING)
        if not isinstance(spec, Setting):
            raise TypeError(f"{cls.__name__}.{f.name} is not a setting(): give it a description and a check")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{f.name} has no default")
        out.append(Field(f.name, spec.key or f.name, spec, default))
    return out


def walk(cls: type[Any], prefix: str = "") -> Iterator[tuple[str, Field]]:
    """(dotted key, Field) of every setting of ``cls`` and of its sections, depth first, in order."""
    for f in fields_of(cls):
        path = f"{prefix}{f.key}"
        yield path, f
        if f.section is not None:
            yield from walk(f.section, f"{path}.")


def read_section(cls: type[S], value: object, where: str, ctx: Context) -> S:
    """The section ``cls`` from a YAML mapping (``where`` "" = the top level); ConfigError naming any bad key."""
    raw: dict[Any, Any] = {} if value is None else expect(value, dict, where or "config", "a mapping")
    fields = fields_of(cls)
    keys = {f.key for f in fields}
    bad = sorted(str(k) for k in raw if k not in keys)
    if bad:
        renamed = {f.name: f.key for f in fields if f.name != f.key}
        hint = "".join(f" ({b}: write {renamed[b]})" for b in bad if b in renamed)
        head = f"config: {where}: unknown" if where else "config: unknown"
        raise ConfigError(f"{head} setting(s) {', '.join(bad)}{hint}; known: {', '.join(sorted(keys))}")
    kwargs = {f.name: _read(f, raw, where, ctx) for f in fields}
    try:
        section = cls(**kwargs)
    except ConfigError:
        raise
    except InvalidInput as exc:  # the dataclass's own check, e.g. EngineConfig's
        fail(where or "config", str(exc))
    validate = getattr(section, "validate", None)
    if callable(validate):
        validate()
    return section


def read_setting(cls: type[Any], name: str, raw: Mapping[Any, Any], where: str, ctx: Context) -> Any:
    """One setting (the field ``name`` of the section ``cls``) from the section's YAML mapping."""
    for f in fields_of(cls):
        if f.name == name:
            return _read(f, raw, where, ctx)
    raise KeyError(name)


def _read(f: Field, raw: Mapping[Any, Any], where: str, ctx: Context) -> Any:
    """A setting's value: its environment variable, else the YAML's (null = left out), else its default."""
    spec = f.setting
    at = f"{where}.{f.key}" if where else f.key
    text = ctx.env.get(spec.env) if spec.env else None
    if text:
        return spec.check.read(spec.check.from_env(text), f"{spec.env} ({at})", ctx)
    given = raw.get(f.key)
    if given is None or (given == "" and spec.derive is not None):
        default = spec.derive(ctx.data_dir) if spec.derive is not None else f.default
        given = spec.check.dump(default)
    return spec.check.read(given, at, ctx)


def dump_section(section: Any) -> dict[str, Any]:
    """The section as a mapping of plain YAML values that ``read_section`` reads back equal."""
    return {f.key: f.setting.check.dump(getattr(section, f.name)) for f in fields_of(type(section))}
