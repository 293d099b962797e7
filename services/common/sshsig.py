"""SSH signatures (OpenSSH's SSHSIG format) and the account proofs made with them.

SSHSIG is what ``ssh-keygen -Y sign -f KEY -n NAMESPACE`` writes (PROTOCOL.sshsig in
OpenSSH): a blob ``"SSHSIG" uint32(1) string(public key) string(namespace) string(reserved)
string(hash algorithm) string(signature)``, usually armored between ``-----BEGIN SSH
SIGNATURE-----`` lines. The signature covers ``"SSHSIG" string(namespace) string(reserved)
string(hash algorithm) string(H(message))``, so a signature made for one purpose (namespace)
never passes for another.

An account proof (ssh.proto's AccountProof) is such a signature, namespace ``ACCOUNT_NAMESPACE``,
over ``account_message(method, username, epoch, nonce)``: the ssh service verifies it against
the account's current key, and ``gridstor ssh ... -i KEY`` makes it with ``sign``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

import asyncssh
from asyncssh.public_key import decode_ssh_public_key

from services.common import errors

MAGIC = b"SSHSIG"
VERSION = 1
ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
ARMOR_END = "-----END SSH SIGNATURE-----"
HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
WEAK_SIG_ALGORITHMS = frozenset({b"ssh-rsa"})  # RSA with SHA-1: refused by SSHSIG itself
MAX_SIGNATURE_TEXT = 16 * 1024

ACCOUNT_NAMESPACE = "gridstor-ssh-account"
ACCOUNT_DOMAIN = "gridstor/v1/ssh-account"
NONCE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
# The armor lines; a '+' for a space too, as an HTML form or a careless query string encodes it.
_ARMORED = re.compile(r"-----BEGIN[ +]SSH[ +]SIGNATURE-----(.*)-----END[ +]SSH[ +]SIGNATURE-----", re.DOTALL)


class BadSignature(errors.InvalidInput):
    """The text is not an SSH signature, or one for another namespace; the message says which."""


@dataclass(frozen=True)
class SshSig:
    """A parsed SSHSIG blob."""

    public_key: bytes  # the signer's key, in SSH wire format
    namespace: str
    hash_algorithm: str
    signature: bytes  # string(algorithm) string(signature bytes), as SSHKey.verify takes it

    @property
    def algorithm(self) -> bytes:
        """The signature algorithm named inside ``signature`` (e.g. ssh-ed25519, rsa-sha2-512)."""
        return _strings(self.signature, 1)[0][0]


def account_message(method: str, username: str, epoch: int, nonce: str) -> bytes:
    """What an account proof signs: the RPC, the account, the time and a nonce, one per line (UTF-8)."""
    return f"{ACCOUNT_DOMAIN}\n{method}\n{username}\n{epoch}\n{nonce}".encode()


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _strings(data: bytes, count: int) -> tuple[list[bytes], bytes]:
    """``count`` SSH strings from the start of ``data`` and what follows them; BadSignature when short."""
    out = []
    for _ in range(count):
        if len(data) < 4:
            raise BadSignature("the signature is truncated")
        (n,) = struct.unpack(">I", data[:4])
        if len(data) < 4 + n:
            raise BadSignature("the signature is truncated")
        out.append(data[4 : 4 + n])
        data = data[4 + n :]
    return out, data


def signed_data(namespace: str, hash_algorithm: str, message: bytes) -> bytes:
    """The bytes an SSHSIG signature covers."""
    digest = HASHES[hash_algorithm](message).digest()
    return MAGIC + _string(namespace.encode()) + _string(b"") + _string(hash_algorithm.encode()) + _string(digest)


def parse(text: str) -> SshSig:
    """An SSHSIG from its armored text (as ssh-keygen prints it) or its base64 alone; BadSignature otherwise."""
    if len(text) > MAX_SIGNATURE_TEXT:
        raise BadSignature(f"the signature is {len(text)} characters; an SSH signature is far shorter")
    body = text.strip()
    if body.startswith("-----BEGIN"):
        armored = _ARMORED.fullmatch(body)
        if armored is None:
            raise BadSignature(f"an armored signature runs from {ARMOR_BEGIN} to {ARMOR_END}")
        body = armored.group(1)
    compact = "".join(body.split())
    if not compact:
        raise BadSignature("the signature is empty")
    try:
        blob = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise BadSignature("the signature is not base64 (give the armored text ssh-keygen -Y sign prints)") from None
    if not blob.startswith(MAGIC):
        raise BadSignature("the signature is not an SSH signature (SSHSIG)")
    rest = blob[len(MAGIC) :]
    if len(rest) < 4 or struct.unpack(">I", rest[:4])[0] != VERSION:
        raise BadSignature(f"the SSH signature is not of version {VERSION}")
    fields, extra = _strings(rest[4:], 5)
    if extra:
        raise BadSignature("the SSH signature has bytes after its end")
    public_key, namespace, _reserved, hash_algorithm, signature = fields
    hash_name = hash_algorithm.decode(errors="replace")
    if hash_name not in HASHES:
        raise BadSignature(f"the SSH signature uses the hash {hash_name!r}; sha256 or sha512 are accepted")
    return SshSig(public_key, namespace.decode(errors="replace"), hash_name, signature)


def verify(sig: SshSig, key_blob: bytes, namespace: str, message: bytes) -> bool:
    """Whether ``sig`` is ``key_blob``'s signature of ``message`` in ``namespace`` (parse first)."""
    if sig.namespace != namespace or sig.public_key != key_blob:
        return False
    try:
        if sig.algorithm in WEAK_SIG_ALGORITHMS:
            return False
        key = decode_ssh_public_key(key_blob)
        return bool(key.verify(signed_data(namespace, sig.hash_algorithm, message), sig.signature))
    except (asyncssh.KeyImportError, BadSignature, ValueError):
        return False


def _sig_algorithm(key: asyncssh.SSHKey) -> bytes:
    algorithms = list(key.sig_algorithms)
    for preferred in (b"rsa-sha2-512", b"rsa-sha2-256"):  # as ssh-keygen: never SHA-1 for RSA
        if preferred in algorithms:
            return preferred
    return algorithms[0]


def sign(key: asyncssh.SSHKey, namespace: str, message: bytes, hash_algorithm: str = "sha512") -> str:
    """The armored SSHSIG of ``message`` by the private ``key``, as ``ssh-keygen -Y sign`` prints it."""
    signature = key.sign(signed_data(namespace, hash_algorithm, message), _sig_algorithm(key))
    blob = (
        MAGIC
        + struct.pack(">I", VERSION)
        + _string(bytes(key.public_data))
        + _string(namespace.encode())
        + _string(b"")
        + _string(hash_algorithm.encode())
        + _string(signature)
    )
    encoded = base64.b64encode(blob).decode()
    lines = [encoded[i : i + 76] for i in range(0, len(encoded), 76)]
    return "\n".join([ARMOR_BEGIN, *lines, ARMOR_END]) + "\n"
