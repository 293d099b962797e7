"""What a login token was granted on, so that every call can check the grant still stands.

auth's Authenticate stamps each token it issues with a grant (the ``grt`` claim, tokens.py):

* public mode: ``public``;
* secret mode: ``secret:<digest>``, a digest of the shared secret keyed by the gateway key, so it
  changes when the secret does and tells nothing about the secret (the secret itself never goes
  into a token);
* allowlist mode: ``allowlist:<digest>``, a digest of the identity's public key, so it changes
  when that identity's key is replaced.

Every service's guard (rpc.Guard) recomputes the grant the running config gives the token's
subject and refuses the token when they differ: the identity left the allowlist, its key or the
secret changed, or the gateway runs in another mode. The config is read at start, so such a change
takes effect when the services restart (docs/security.md). Admin and service tokens (subjects
``admin:...`` and ``service:...``) are minted from the gateway key itself and carry no grant: they
last as long as that key and their ttl.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from nacl.signing import SigningKey

from services.common.config import Config
from services.common.tokens import TokenError

DIGEST_CHARS = 24  # 96 bits: enough to tell grants apart, short in every token
_KEY_DOMAIN = b"gridstor/v1/grant-key\n"


class Grants:
    """The grants of one gateway config: what a token must carry to be honoured now."""

    def __init__(self, mode: str, secret: str, allowlist: Mapping[str, str], key: SigningKey) -> None:
        self.mode = mode
        # Keyed by the gateway's private key: a token (shown to its holder, maybe logged by a proxy)
        # must not allow guessing a weak secret offline from its digest.
        self._mac_key = hashlib.sha256(_KEY_DOMAIN + key.encode()).digest()
        self._secret = self._digest(b"secret\n" + secret.encode()) if mode == "secret" else ""
        self._keys = {
            ident: self._digest(b"allowlist\n" + bytes.fromhex(hexkey)) for ident, hexkey in allowlist.items()
        }

    @classmethod
    def from_config(cls, cfg: Config, key: SigningKey) -> Grants:
        """The grants ``cfg`` gives (its mode, secret and allowlist), keyed by the gateway key ``key``."""
        return cls(cfg.mode, cfg.secret, cfg.allowlist, key)

    def _digest(self, data: bytes) -> str:
        return hmac.new(self._mac_key, data, hashlib.sha256).hexdigest()[:DIGEST_CHARS]

    def grant_for(self, identity: str) -> str:
        """The grant a token issued now for ``identity`` carries (its credentials already checked)."""
        if self.mode == "secret":
            return f"secret:{self._secret}"
        if self.mode == "allowlist":
            return f"allowlist:{self._keys.get(identity, '')}"
        return "public"

    def check(self, subject: str, grant: str) -> None:
        """Nothing when a login token of ``subject`` granted on ``grant`` is still honoured, else TokenError."""
        if not grant:
            raise TokenError("this token records no grant (it predates this gateway version): authenticate again")
        mode, _, digest = grant.partition(":")
        if mode != self.mode:
            raise TokenError(
                f"this token was issued in {mode} mode and the gateway now runs in {self.mode} mode: authenticate again"
            )
        if mode == "secret" and not hmac.compare_digest(digest, self._secret):
            raise TokenError("the gateway's shared secret changed since this token was issued: authenticate again")
        if mode == "allowlist":
            current = self._keys.get(subject)
            if current is None:
                raise TokenError(f"identity {subject!r} is no longer in the gateway's allowlist")
            if not hmac.compare_digest(digest, current):
                raise TokenError(
                    f"the key of identity {subject!r} changed since this token was issued: authenticate again"
                )
