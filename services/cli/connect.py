"""Where the CLI finds the gateway, and the credentials it keeps in the user's config dir.

Addresses, first match wins: ``--gateway [https://]HOST:PORT`` (every service
behind one address, e.g. Envoy), ``--config FILE`` (the host and ports of a
gateway config), ``$GRIDSTOR_GATEWAY``, ``$GRIDSTOR_CONFIG``, else the local
defaults (127.0.0.1 and ``config.DEFAULT_PORTS``, what ``make up`` runs).

TLS: ``https://`` in the gateway address, or a config whose services use TLS
(``tls.internal``, on when they listen beyond loopback). The server's
certificate is verified against ``--ca FILE``, else ``$GRIDSTOR_CA``, else (with
a config) its ``tls.ca``, else the system's CAs (a public CA's certificate).

Token, first match wins: ``--token``, ``$GRIDSTOR_TOKEN``, the token file
(``$GRIDSTOR_TOKEN_FILE``, else ``~/.config/gridstor/token``) that ``login``
writes with mode 0600.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from nacl.signing import SigningKey

from services.cli.failures import EXIT_USAGE, CliFailure
from services.common import net
from services.common.config import DEFAULT_PORTS, ConfigError, load_config

HTTPS = "https://"
_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def parse_hostport(text: str) -> str:
    """``text`` if it is ``HOST:PORT`` or ``https://HOST:PORT`` ([v6]:PORT too), else ValueError saying what to give."""
    text = text.strip()
    m = _HOSTPORT.match(text.removeprefix(HTTPS))
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ValueError(
            f"expected HOST:PORT (plain, like 127.0.0.1:7103) or https://HOST:PORT (TLS, like"
            f" https://gw.example.org:8080), got {text!r}"
        )
    return text


def split_gateway(text: str) -> tuple[str, bool]:
    """(HOST:PORT, whether TLS) of a gateway address checked by ``parse_hostport``."""
    return text.removeprefix(HTTPS), text.startswith(HTTPS)


@dataclass(frozen=True)
class Endpoints:
    """The gRPC address of each service, whether they speak TLS (and the CA to trust), where that came from."""

    addresses: Mapping[str, str]
    source: str
    tls: bool = False
    ca: Path | None = None  # None: the system's CAs

    def of(self, service: str) -> str:
        return self.addresses[service]


def resolve_endpoints(
    gateway: str | None, config: str | None, env: Mapping[str, str] | None = None, ca: str | None = None
) -> Endpoints:
    """The addresses to use (see the module docstring); CliFailure (exit 2) for a bad value."""
    env = os.environ if env is None else env
    ca = ca or env.get("GRIDSTOR_CA") or None
    ca_path = Path(ca).expanduser() if ca else None
    if ca_path is not None and not ca_path.is_file():
        raise CliFailure(
            f"--ca / GRIDSTOR_CA: {ca_path} is not a readable file (the gateway's CA certificate)", EXIT_USAGE
        )
    if gateway is None and config is None:
        gateway = env.get("GRIDSTOR_GATEWAY") or None
        if gateway is not None:
            try:
                gateway = parse_hostport(gateway)
            except ValueError as exc:
                raise CliFailure(f"GRIDSTOR_GATEWAY: {exc}", EXIT_USAGE) from None
        else:
            config = env.get("GRIDSTOR_CONFIG") or None
    if gateway is not None:
        address, secure = split_gateway(gateway)
        return Endpoints(dict.fromkeys(DEFAULT_PORTS, address), f"gateway {gateway}", secure, ca_path)
    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            raise CliFailure(str(exc), EXIT_USAGE) from None
        addresses = {s: net.hostport(net.dial_host(cfg.listen_host), p) for s, p in cfg.ports.items()}
        if cfg.internal_tls and ca_path is None:
            ca_path = cfg.tls_path(cfg.tls.ca)
        return Endpoints(addresses, f"config {config}", cfg.internal_tls, ca_path)
    return Endpoints({s: net.hostport("127.0.0.1", p) for s, p in DEFAULT_PORTS.items()}, "local defaults")


def open_channel(address: str, tls: bool = False, ca: Path | None = None) -> grpc.Channel:
    """A channel with room for 1 MiB download messages: plain, or TLS verified against ``ca`` (None: system CAs)."""
    roots = None
    if tls and ca is not None:
        try:
            roots = ca.read_bytes()
        except OSError as exc:
            raise CliFailure(f"cannot read the CA file {ca}: {exc.strerror}", EXIT_USAGE) from None
    return net.channel(address, tls=tls, ca=roots)


# -- files in the user's config dir ------------------------------------------------------------------


def config_home(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/gridstor``, else ``~/.config/gridstor``."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gridstor"


def token_path(env: Mapping[str, str] | None = None) -> Path:
    """Where ``login`` keeps the token."""
    env = os.environ if env is None else env
    explicit = env.get("GRIDSTOR_TOKEN_FILE")
    return Path(explicit).expanduser() if explicit else config_home(env) / "token"


def default_key_path(env: Mapping[str, str] | None = None) -> Path:
    """Where ``keygen`` writes the private key by default."""
    return config_home(env) / "id_ed25519"


def write_private(path: Path, text: str, *, overwrite: bool = True) -> None:
    """Write ``text`` to ``path`` with mode 0600 atomically (the parent made 0700 when created)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not overwrite and path.exists():
        raise CliFailure(f"{path} exists already; use --force to replace it (the old key is lost)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def load_token(path: Path) -> str:
    """The token stored at ``path``, or "" when there is none."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise CliFailure(f"cannot read the token file {path}: {exc.strerror}") from None


def token_expiry(token: str) -> int | None:
    """The expiry (Unix seconds) a gridstor token states, unverified; None when it cannot be read."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return int(data["exp"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None


def load_signing_key(path: Path) -> SigningKey:
    """An ed25519 private key from a file written by ``keygen`` (64 hex characters of the seed)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliFailure(f"cannot read the key file {path}: {exc.strerror}") from None
    text = raw.strip()
    try:
        seed = bytes.fromhex(text.decode("ascii")) if len(text) == 64 else b""
    except (UnicodeDecodeError, ValueError):
        seed = b""
    if len(seed) != 32:
        raise CliFailure(f"{path} is not a gridstor private key (expected 64 hex characters; make one with keygen)")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CliFailure(f"the key file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    return SigningKey(seed)
