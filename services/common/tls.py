"""TLS material: a local CA and the gateway's server certificate (``cryptography``), and loading them.

* ``generate_ca`` and ``issue_server_cert`` are pure: keys and certificates in,
  keys and certificates out (ECDSA P-256; the CA for 10 years, a server
  certificate for 825 days, the most Apple platforms accept from a private CA).
* ``ensure_local(cfg)`` is ``make up``'s first-start step: for the default paths
  in ``DATA/tls`` it creates ``ca.pem``/``ca.key`` and ``server.pem``/``server.key``
  (keys 0600) and re-issues the server certificate when it is missing, expires
  within 30 days or lacks a name the config needs. Files elsewhere (a public CA's
  certificate, compose's mounted folder) are only checked, never written.
* ``server_pair(cfg)`` / ``ca_bytes(cfg)`` read what gRPC credentials, Envoy
  and HTTPS clients need, with a message naming the file and the problem.
* ``diagnose(host, port, ca)`` says in words why a TLS handshake fails
  (expired, unknown CA, wrong name, no TLS on that port): grpc's own message
  rarely names the certificate problem.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common import net
from services.common.config import Config, ConfigError

CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_BEFORE = dt.timedelta(days=30)
CLOCK_SKEW = dt.timedelta(hours=1)  # certificates start a little in the past: clients' clocks differ
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
TLS_DIR = "tls"
CA_KEY_NAME = "ca.key"  # beside ca.pem: only a CA made here has one, and only then are certificates issued here

Key = ec.EllipticCurvePrivateKey


class TlsError(ConfigError):
    """A TLS file is missing, unreadable, expired or does not match its key; the message names it."""


@dataclass(frozen=True)
class TlsFiles:
    """The configured TLS files, absolute."""

    ca: Path
    cert: Path
    key: Path
    edge_cert: Path
    edge_key: Path
    ca_key: Path  # beside ca.pem; used only for the managed (default) location

    @property
    def managed(self) -> bool:
        """Whether ca, cert and key all live in the data dir's tls folder (then ``ensure_local`` may write them)."""
        folder = self.ca.parent
        return folder.name == TLS_DIR and self.cert.parent == folder and self.key.parent == folder


def files(cfg: Config) -> TlsFiles:
    """Where ``cfg``'s TLS files are (relative paths are in the data dir)."""
    t = cfg.tls
    ca, cert, key = cfg.tls_path(t.ca), cfg.tls_path(t.cert), cfg.tls_path(t.key)
    edge_cert = cfg.tls_path(t.edge_cert) if t.edge_cert is not None else cert
    edge_key = cfg.tls_path(t.edge_key) if t.edge_key is not None else key
    return TlsFiles(ca, cert, key, edge_cert, edge_key, ca.parent / CA_KEY_NAME)


def tls_in_use(cfg: Config) -> bool:
    """Whether anything of ``cfg`` serves TLS (the edge or the services' ports)."""
    return cfg.tls.edge or cfg.internal_tls


# -- generation (pure) -----------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> Key:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def generate_ca(
    common_name: str = "gridstor local CA", *, days: int = CA_DAYS, now: dt.datetime | None = None
) -> tuple[Key, x509.Certificate]:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = new_key()
    now = now or _now()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def issue_server_cert(
    ca_key: Key,
    ca_cert: x509.Certificate,
    names: Sequence[str],
    *,
    days: int = SERVER_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[Key, x509.Certificate]:
    """A server (and client) certificate for ``names`` (DNS names and IP addresses), signed by the CA.

    ``not_before``/``not_after`` override the validity (tests make expired certificates with them).
    """
    if not names:
        raise ValueError("a server certificate needs at least one name")
    key = new_key()
    start = not_before or (_now() - CLOCK_SKEW)
    end = not_after or (start + CLOCK_SKEW + dt.timedelta(days=days))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Key) -> bytes:
    """The key as unencrypted PKCS#8 PEM (what Envoy and gRPC read)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def wanted_names(cfg: Config) -> list[str]:
    """The names the gateway's certificate must carry: loopback, the listen host, service hosts, ``tls.names``."""
    out: list[str] = []
    for name in [*LOCAL_NAMES, cfg.listen_host, *cfg.hosts.values(), *cfg.tls.names]:
        name = name.strip("[]")
        if name in net.WILDCARD_HOSTS:
            continue
        with contextlib.suppress(ValueError):
            name = str(ipaddress.ip_address(name))  # one spelling per address
        if name not in out:
            out.append(name)
    return out


# -- files -----------------------------------------------------------------------------------------


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` (a key is never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # the umask may have taken bits off
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"config: {what}: {path} does not exist") from None
    except OSError as exc:
        raise TlsError(f"config: {what}: cannot read {path}: {exc.strerror}") from None


def load_cert(path: Path, what: str = "tls.cert") -> x509.Certificate:
    """The first certificate of a PEM file."""
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise TlsError(f"config: {what}: {path} holds no PEM certificate") from None


def load_key(path: Path, what: str = "tls.key") -> Key:
    """An unencrypted EC or RSA private key from a PEM file (typed as EC; RSA keys work the same here)."""
    data = _read(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise TlsError(f"config: {what}: {path} holds no unencrypted PEM private key") from None
    return key  # type: ignore[return-value]


def _fmt(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


def check_pair(
    cert_path: Path, key_path: Path, *, what: str = "tls", now: dt.datetime | None = None
) -> x509.Certificate:
    """The certificate at ``cert_path`` after checking it is current and matches ``key_path``; TlsError if not.

    ``what`` names the settings in messages: ``tls`` (cert, key) or ``tls.edge`` (edge_cert, edge_key).
    """
    now = now or _now()
    prefix = "tls." if what == "tls" else "tls.edge_"
    cert = load_cert(cert_path, prefix + "cert")
    key = load_key(key_path, prefix + "key")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, pub) != key.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ):
        raise TlsError(f"config: {what}: the key {key_path} does not belong to the certificate {cert_path}")
    if cert.not_valid_after_utc <= now:
        raise TlsError(
            f"config: {what}: the certificate {cert_path} expired on {_fmt(cert.not_valid_after_utc)};"
            " renew it (or delete it and its key to have `make up` issue a new one from the local CA)"
        )
    if cert.not_valid_before_utc > now + CLOCK_SKEW:
        raise TlsError(
            f"config: {what}: the certificate {cert_path} is valid only from {_fmt(cert.not_valid_before_utc)}"
            " (is this machine's clock right?)"
        )
    return cert


@dataclass
class Report:
    """What ``ensure_local`` found and did, for the launcher's output."""

    files: TlsFiles
    created_ca: bool = False
    issued: bool = False
    names: list[str] = field(default_factory=list)
    expires: dt.datetime | None = None

    def lines(self) -> list[str]:
        out = []
        if self.created_ca:
            out.append(f"created a local CA: {self.files.ca} (valid {CA_DAYS // 365} years; key {self.files.ca_key})")
        if self.issued:
            out.append(f"issued the gateway certificate {self.files.cert} for {', '.join(self.names)}")
        return out


def ensure_local(cfg: Config, *, now: dt.datetime | None = None) -> Report:
    """Make sure the TLS files ``cfg`` names exist and are usable, creating the local ones when needed.

    Managed location (ca, cert and key in ``DATA/tls``): create the CA if it is
    missing; (re-)issue the server certificate when it is missing, expires
    within 30 days, lacks a name of ``wanted_names`` or was signed by another
    CA. Anywhere else nothing is written: the files in use must exist and be
    current (the CA only with internal TLS; cert and key unless only Envoy
    serves TLS, with its own ``edge_cert``).
    """
    now = now or _now()
    f = files(cfg)
    own_edge = (f.edge_cert, f.edge_key) != (f.cert, f.key)
    if f.managed:
        report = ensure_issued(f, wanted_names(cfg), now=now)
    else:
        report = Report(f)
        if cfg.internal_tls:  # the CA is what the services' clients verify with
            load_cert(f.ca, "tls.ca")
        if cfg.internal_tls or (cfg.tls.edge and not own_edge):
            cert = check_pair(f.cert, f.key, now=now)
            report.names, report.expires = cert_names(cert), cert.not_valid_after_utc
    if cfg.tls.edge and own_edge:
        check_pair(f.edge_cert, f.edge_key, what="tls.edge", now=now)
    return report


def ensure_issued(f: TlsFiles, names: list[str], *, now: dt.datetime | None = None) -> Report:
    """Create the CA (``f.ca``, ``f.ca_key``) if neither exists; (re-)issue ``f.cert`` for ``names`` when needed."""
    now = now or _now()
    report = Report(f)
    if not f.ca.exists() and not f.ca_key.exists():
        ca_key, ca_cert = generate_ca(now=now)
        write_file(f.ca_key, key_pem(ca_key), 0o600)
        write_file(f.ca, cert_pem(ca_cert), 0o644)
        report.created_ca = True
    ca_cert = load_cert(f.ca, "tls.ca")
    reason = _reissue_reason(f, ca_cert, names, now)
    if reason:
        if not f.ca_key.exists():
            raise TlsError(
                f"config: tls: the certificate {f.cert} {reason}, and the CA {f.ca} has no key beside it"
                f" ({f.ca_key}) to issue a new one: put a current certificate and key there, or remove"
                f" {f.ca} too to start a new local CA"
            )
        ca_key = load_key(f.ca_key, "tls.ca key")
        key, cert = issue_server_cert(ca_key, ca_cert, names)
        write_file(f.key, key_pem(key), 0o600)
        write_file(f.cert, cert_pem(cert), 0o644)
        report.issued = True
    cert = check_pair(f.cert, f.key, now=now)
    report.names = cert_names(cert)
    report.expires = cert.not_valid_after_utc
    return report


def _reissue_reason(f: TlsFiles, ca_cert: x509.Certificate, names: Iterable[str], now: dt.datetime) -> str:
    """Why the managed server certificate must be issued again ("" when it is fine)."""
    if not f.cert.exists() or not f.key.exists():
        return "is missing"
    try:
        cert = check_pair(f.cert, f.key, now=now)
    except TlsError as exc:
        return f"is not usable ({str(exc).removeprefix('config: tls: ')})"
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return f"expires on {_fmt(cert.not_valid_after_utc)}"
    if cert.issuer != ca_cert.subject:
        return "was not issued by this CA"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "was not issued by this CA"
    missing = [n for n in names if n not in cert_names(cert)]
    if missing:
        return f"lacks the name(s) {', '.join(missing)}"
    return ""


# -- loading for servers and clients -----------------------------------------------------------------


def server_pair(cfg: Config) -> tuple[bytes, bytes]:
    """(private key PEM, certificate chain PEM) of the services' ports, checked; TlsError naming the problem."""
    f = files(cfg)
    check_pair(f.cert, f.key)
    return _read(f.key, "tls.key"), _read(f.cert, "tls.cert")


def ca_bytes(cfg: Config) -> bytes:
    """The CA certificate(s) PEM the services verify each other's certificates against."""
    f = files(cfg)
    load_cert(f.ca, "tls.ca")
    return _read(f.ca, "tls.ca")


def server_ssl_context(cfg: Config) -> ssl.SSLContext:
    """An SSLContext serving the services' certificate (their metrics endpoints)."""
    f = files(cfg)
    check_pair(f.cert, f.key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(f.cert, f.key)
    return ctx


def client_ssl_context(ca: Path | None) -> ssl.SSLContext:
    """An SSLContext verifying servers against ``ca`` (None: the system's CAs)."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# -- diagnosis ---------------------------------------------------------------------------------------


def diagnose(host: str, port: int, ca: Path | None, *, timeout: float = 3.0) -> str:
    """Why a TLS client verifying against ``ca`` cannot talk to ``host:port``, in words; "" if it can.

    The answers name the problem: ``certificate has expired``, ``unable to get
    local issuer certificate`` (not signed by that CA), ``Hostname mismatch``,
    ``the server does not speak TLS on this port`` ...
    """
    host = host.strip("[]")
    try:
        ctx = client_ssl_context(ca)
    except (OSError, ssl.SSLError) as exc:
        return f"cannot load the CA file {ca}: {getattr(exc, 'strerror', None) or exc}"
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            ctx.wrap_socket(sock, server_hostname=host),
        ):
            return ""
    except ssl.SSLCertVerificationError as exc:
        return f"certificate verify failed: {exc.verify_message}"
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if reason in ("WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE") or (
            "EOF" in str(exc)
        ):
            return "the server does not speak TLS on this port"
        return f"TLS handshake failed: {reason}"
    except (ConnectionResetError, BrokenPipeError):
        return "the server does not speak TLS on this port"
    except TimeoutError:
        return "the TLS handshake timed out (does the server speak TLS on this port?)"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"


def speaks_tls(host: str, port: int, *, timeout: float = 3.0) -> bool:
    """Whether ``host:port`` completes a TLS handshake (any certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout) as sock, ctx.wrap_socket(sock):
            return True
    except (OSError, ssl.SSLError):
        return False
