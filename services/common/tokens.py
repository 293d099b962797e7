"""Bearer tokens signed by the gateway's ed25519 key, verified locally by every service.

Format: ``gs1.<payload>.<signature>``, both parts base64url without padding.
The payload is compact JSON ``{"sub", "iat", "exp", "kid", "jti"}`` plus, on a
login token, ``"grt"``: what it was granted on (services/common/grants.py), which
every call checks against the running config. The signature is ed25519 over
``b"gridstor/v1/token\\n" + payload bytes`` (domain separated from receipts and
auth messages signed by the same key).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from services.common.errors import Unauthenticated
from services.common.keys import key_id

PREFIX = "gs1"
DOMAIN = b"gridstor/v1/token\n"
MAX_TOKEN_LEN = 1024
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class TokenError(Unauthenticated):
    """A token is missing, malformed, forged, expired or no longer granted; the message says which.

    ``error`` is the RFC 6750 error code the HTTP challenge (WWW-Authenticate) carries: ``invalid_token``,
    ``invalid_request`` for a malformed authorization header, or "" when no token was sent at all.
    """

    def __init__(self, message: str, *, error: str = "invalid_token") -> None:
        super().__init__(message)
        self.error = error


@dataclass(frozen=True)
class Claims:
    subject: str
    issued_at: int
    expires_at: int
    key_id: str
    token_id: str
    grant: str = ""  # login tokens: what they were granted on (grants.py); "" for admin and service tokens


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    # urlsafe_b64decode silently drops characters outside the alphabet; refuse them instead.
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(key: SigningKey, subject: str, ttl: int, now: float | None = None, *, grant: str = "") -> tuple[str, Claims]:
    """A new token for ``subject`` valid ``ttl`` seconds, granted on ``grant`` (see grants.py)."""
    iat = int(time.time() if now is None else now)
    claims = Claims(subject, iat, iat + ttl, key_id(key.verify_key), os.urandom(8).hex(), grant)
    fields: dict[str, object] = {
        "sub": subject,
        "iat": iat,
        "exp": claims.expires_at,
        "kid": claims.key_id,
        "jti": claims.token_id,
    }
    if grant:
        fields["grt"] = grant
    payload = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
    sig = key.sign(DOMAIN + payload).signature
    return f"{PREFIX}.{_b64e(payload)}.{_b64e(sig)}", claims


def verify(key: VerifyKey, token: str, now: float | None = None) -> Claims:
    """The claims of a valid token, or TokenError saying why it is refused."""
    if not token:
        raise TokenError(
            "no token: send 'authorization: Bearer <token>' (get one from AuthService.Authenticate)", error=""
        )
    if len(token) > MAX_TOKEN_LEN:
        raise TokenError("token is too long")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenError("token is malformed (expected gs1.<payload>.<signature>)")
    try:
        payload, sig = _b64d(parts[1]), _b64d(parts[2])
    except (binascii.Error, ValueError):
        raise TokenError("token is malformed (bad base64)") from None
    try:
        key.verify(DOMAIN + payload, sig)
    except (BadSignatureError, ValueError):
        raise TokenError("token signature is invalid (forged, or signed by another gateway key)") from None
    try:
        data = json.loads(payload)
        claims = Claims(
            str(data["sub"]),
            int(data["iat"]),
            int(data["exp"]),
            str(data["kid"]),
            str(data["jti"]),
            str(data.get("grt", "")),
        )
    except (ValueError, KeyError, TypeError):
        raise TokenError("token payload is malformed") from None
    if (time.time() if now is None else now) >= claims.expires_at:
        raise TokenError("token has expired; authenticate again")
    return claims
