"""Authentication: credentials in, gateway-signed bearer tokens out (no grpc here).

Modes (``Config.mode``):

* ``public``: anyone gets a token, for the identity they name or ``anonymous``.
* ``secret``: the caller proves it knows the shared secret (constant-time compare).
* ``allowlist``: the caller signs ``"gridstor/v1/auth\\n<identity>\\n<epoch>"``
  (UTF-8, epoch in decimal seconds) with the ed25519 key the allowlist holds for
  that identity. The epoch must lie within ``auth_skew`` seconds of the server's
  clock, and each signed message works once (services/common/replay.py: its first
  use is recorded in Redis, so every auth process sharing that Redis refuses a replay).

Each token records what it was granted on (services/common/grants.py): every call
checks it against the running config, so a token ends when its grant does.

Only the identity a token speaks for is verified in allowlist mode; in the other
modes it is the caller's own claim, limited to the identity grammar so it can
never pose as a service (``service:<name>``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from services.common import errors, tokens
from services.common.config import Config
from services.common.grants import Grants
from services.common.keys import key_id
from services.common.replay import RedisReplayGuard, ReplayGuard

__all__ = ["AuthRefused", "Authenticator", "Grant", "RedisReplayGuard", "ReplayGuard", "auth_message"]

AUTH_DOMAIN = "gridstor/v1/auth"
ALGORITHM = "ed25519"
ANONYMOUS = "anonymous"
SIGNATURE_BYTES = 64
IDENTITY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # as config.py's allowlist names: no ':' -> no "service:" subjects

# Unknown identities are checked against this key so they take as long as a wrong signature.
_DUMMY_KEY = SigningKey(b"\x01" * 32).verify_key


def auth_message(identity: str, epoch: int) -> bytes:
    """The bytes a client signs in allowlist mode (the contract in auth.proto)."""
    return f"{AUTH_DOMAIN}\n{identity}\n{epoch}".encode()


class AuthRefused(errors.Unauthenticated):
    """Credentials refused; ``reason`` is a metric label, ``detail`` is for the log only."""

    def __init__(self, reason: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.detail = detail or message


@dataclass(frozen=True)
class Grant:
    """An issued token and what the reply tells about it."""

    token: str
    expires_at: int
    identity: str
    key_id: str
    token_id: str


class Authenticator:
    """Checks credentials according to the gateway's security mode and issues tokens."""

    def __init__(
        self,
        *,
        mode: str,
        signing_key: SigningKey,
        token_ttl: int,
        skew: int,
        secret: str = "",
        allowlist: Mapping[str, str] | None = None,
        replay: ReplayGuard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode == "secret" and not secret:
            raise errors.InvalidInput("secret mode needs a shared secret")
        if mode == "allowlist" and replay is None:
            raise errors.InvalidInput("allowlist mode needs a replay-protection store (redis)")
        self.mode = mode
        self.signing_key = signing_key
        self.token_ttl = token_ttl
        self.skew = skew
        self._secret = secret.encode()
        self._keys = {ident: VerifyKey(bytes.fromhex(hexkey)) for ident, hexkey in (allowlist or {}).items()}
        self.replay = replay
        self.clock = clock
        self.key_id = key_id(signing_key.verify_key)
        self.grants = Grants(mode, secret, allowlist or {}, signing_key)

    @classmethod
    def from_config(cls, cfg: Config, signing_key: SigningKey, replay: ReplayGuard | None) -> Authenticator:
        """An authenticator with the mode, secret, allowlist, ttl and skew of ``cfg``."""
        return cls(
            mode=cfg.mode,
            signing_key=signing_key,
            token_ttl=cfg.token_ttl,
            skew=cfg.auth_skew,
            secret=cfg.secret,
            allowlist=cfg.allowlist,
            replay=replay,
        )

    @property
    def replay_ttl(self) -> int:
        """Seconds a used message is remembered: past the whole window it could be accepted in."""
        # An epoch is accepted from epoch-skew to epoch+skew; the margin covers clock
        # differences between auth processes sharing the store.
        return 2 * self.skew + 5

    def public_key(self) -> tuple[bytes, str, str]:
        """The verification key bytes, its key id and the algorithm name."""
        return bytes(self.signing_key.verify_key), self.key_id, ALGORITHM

    async def authenticate(
        self, identity: str, epoch: int = 0, *, signature: bytes | None = None, secret: str | None = None
    ) -> Grant:
        """A token for valid credentials, else AuthRefused (or InvalidInput) saying why."""
        if identity and not IDENTITY.match(identity):
            raise errors.InvalidInput("identity must be 1-64 of letters, digits, '_', '.', '-'")
        if self.mode == "allowlist":
            await self._check_allowlist(identity, epoch, signature, secret)
        elif self.mode == "secret":
            self._check_secret(secret, signature)
        subject = identity or ANONYMOUS
        grant = self.grants.grant_for(subject)
        token, claims = tokens.issue(self.signing_key, subject, self.token_ttl, now=self.clock(), grant=grant)
        return Grant(token, claims.expires_at, identity, claims.key_id, claims.token_id)

    def _check_secret(self, secret: str | None, signature: bytes | None) -> None:
        if secret is None or secret == "":
            hint = " (a signature was sent, but this gateway does not use allowlist mode)" if signature else ""
            raise AuthRefused("missing_secret", f"this gateway runs in secret mode: send the shared secret{hint}")
        if not hmac.compare_digest(secret.encode(), self._secret):
            raise AuthRefused("wrong_secret", "wrong shared secret")

    async def _check_allowlist(self, identity: str, epoch: int, signature: bytes | None, secret: str | None) -> None:
        if signature is None or signature == b"":
            hint = " (a secret was sent, but this gateway does not use secret mode)" if secret else ""
            raise AuthRefused(
                "missing_signature",
                "this gateway runs in allowlist mode: send identity, epoch and an ed25519 signature over"
                f" '{AUTH_DOMAIN}\\n<identity>\\n<epoch>'{hint}",
            )
        if not identity:
            raise AuthRefused("missing_identity", "allowlist mode needs the identity that signed")
        if len(signature) != SIGNATURE_BYTES:
            raise AuthRefused(
                "bad_signature", f"signature must be {SIGNATURE_BYTES} bytes (ed25519), got {len(signature)}"
            )
        now = int(self.clock())
        if epoch < now - self.skew:
            raise AuthRefused(
                "epoch_too_old",
                f"epoch {epoch} is {now - epoch} s old; the server accepts {self.skew} s either side of its clock"
                f" (now {now}): sign the current time, and check the client's clock",
            )
        if epoch > now + self.skew:
            raise AuthRefused(
                "epoch_in_future",
                f"epoch {epoch} is {epoch - now} s in the future; the server accepts {self.skew} s either side of"
                f" its clock (now {now}): check the client's clock",
            )
        message = auth_message(identity, epoch)
        known = self._keys.get(identity)
        try:
            (known or _DUMMY_KEY).verify(message, signature)
            good = known is not None
        except (BadSignatureError, ValueError):
            good = False
        if not good:
            # One answer for both, so the endpoint does not reveal which identities exist.
            detail = "bad signature" if known is not None else "identity not in the allowlist"
            raise AuthRefused("bad_signature", "unknown identity or bad signature", detail)
        assert self.replay is not None
        # Keyed by the signed message, not the signature bytes: ed25519 is deterministic, so
        # this is the same for honest clients and also catches any re-encoding of a signature.
        digest = hashlib.sha256(message).hexdigest()
        if not await self.replay.first_use(digest, self.replay_ttl):
            raise AuthRefused(
                "replayed", "this signature was already used (replay refused): sign a fresh epoch for each login"
            )
