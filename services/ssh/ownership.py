"""Who may manage an SSH account: the rule every SshService method applies before it acts.

Creating a new account is open to every caller the guard lets in (as the owner's design
says). An existing account may be changed (EnableAccount), disabled or removed
(DisableAccount), sized (HomeSize) or processed (Process) by:

* an admin: the gateway admin token (``admin:...``), or in allowlist mode an identity listed
  in ``admins`` (services/common/rpc.py ``Caller.admin``);
* in allowlist mode, its owner: the proven identity that created it (``Account.owner``);
* otherwise, whoever proves they hold its current SSH key with an account proof: an SSH
  signature (services/common/sshsig.py) over the method, the username, the epoch and a
  nonce. That is the rule in public and secret modes, where identities are only claimed,
  and in allowlist mode for an account without an owner (created in another mode, or before
  owners were recorded). There, a proven identity that changes the account with such a proof
  (EnableAccount) becomes its owner.

A proof works once (services/common/replay.py) and only within ``auth_skew`` seconds of the
gateway's clock. A refusal is PermissionDenied naming what is missing; a proof that is not
an SSH signature at all is InvalidInput. Nothing here imports grpc.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common import errors, sshsig
from services.common.accounts import Account
from services.common.replay import ReplayGuard
from services.common.rpc import Caller

PROOF_REPLAY_PREFIX = "gridstor:ssh:proof-used:"
# What each method does to an account, for the refusals; and the CLI command that proves ownership.
_VERBS = {
    "EnableAccount": ("change", "enable"),
    "DisableAccount": ("disable or remove", "disable"),
    "HomeSize": ("read the size of", "size"),
    "Process": ("process the home of", "process"),
}


@dataclass(frozen=True)
class Proof:
    """An account proof as the request carries it (ssh.proto AccountProof)."""

    epoch: int
    nonce: str
    signature: str


@dataclass(frozen=True)
class Allowed:
    """Why a caller may act on an account, and the owner to record when it changes (None: keep)."""

    how: str  # "new", "admin", "owner" or "key", for the log
    owner: str | None = None


class Ownership:
    """Applies the rule above for a gateway running in ``mode``."""

    def __init__(self, mode: str, replay: ReplayGuard, skew: int, clock: Callable[[], float] = time.time) -> None:
        self.mode = mode
        self.replay = replay
        self.skew = skew
        self.clock = clock

    @property
    def replay_ttl(self) -> int:
        """Seconds a used proof is remembered: past the whole window it could be accepted in."""
        return 2 * self.skew + 5

    async def allow(
        self, method: str, username: str, acct: Account | None, caller: Caller, proof: Proof | None
    ) -> Allowed:
        """How ``caller`` may call ``method`` on ``username`` (``acct``: the account now, None when new).

        PermissionDenied (or InvalidInput for a malformed proof) when it may not.
        """
        if acct is None:  # only EnableAccount gets here without an account: creating one is open
            return Allowed("new", caller.identity if caller.proven else "")
        if caller.admin:
            return Allowed("admin")
        verb, command = _VERBS.get(method, (method, method.lower()))
        if self.mode == "allowlist" and acct.owner:
            if caller.identity == acct.owner:
                return Allowed("owner")
            raise errors.PermissionDenied(
                f"SSH account {username!r} belongs to another identity: only its owner or an admin may {verb} it"
            )
        if proof is None:
            raise errors.PermissionDenied(
                f"SSH account {username!r} exists and is not yours to {verb}: prove you hold its SSH key"
                f" (gridstor ssh {command} {username} -i KEY, or an AccountProof signed with `ssh-keygen -Y sign"
                f" -n {sshsig.ACCOUNT_NAMESPACE}`; see docs/security.md), or use an admin token"
            )
        await self._check_proof(method, username, acct, proof)
        claim = caller.identity if caller.proven and method == "EnableAccount" else None
        return Allowed("key", claim)

    async def _check_proof(self, method: str, username: str, acct: Account, proof: Proof) -> None:
        """Nothing when ``proof`` is a fresh signature by the account's current key, else why not."""
        if not sshsig.NONCE.match(proof.nonce):
            raise errors.InvalidInput("the account proof's nonce must be 8-64 of letters, digits, '-' and '_'")
        sig = sshsig.parse(proof.signature)  # BadSignature (InvalidInput) when it is not an SSH signature
        if sig.namespace != sshsig.ACCOUNT_NAMESPACE:
            raise errors.InvalidInput(
                f"the account proof is signed for namespace {sig.namespace[:64]!r}; sign with"
                f" -n {sshsig.ACCOUNT_NAMESPACE}"
            )
        now = int(self.clock())
        if abs(proof.epoch - now) > self.skew:
            when = f"{now - proof.epoch} s old" if proof.epoch < now else f"{proof.epoch - now} s in the future"
            raise errors.PermissionDenied(
                f"the account proof's epoch {proof.epoch} is {when}; the gateway accepts {self.skew} s either side"
                f" of its clock (now {now}): sign the current time, and check the client's clock"
            )
        if sig.public_key != acct.key_blob:
            raise errors.PermissionDenied(
                f"the account proof is signed with another key than SSH account {username!r} has: sign with the"
                " private key of its current public key"
            )
        message = sshsig.account_message(method, username, proof.epoch, proof.nonce)
        # A message ending in a newline (`echo` rather than `printf` before ssh-keygen) is accepted too.
        if not any(sshsig.verify(sig, acct.key_blob, sshsig.ACCOUNT_NAMESPACE, m) for m in (message, message + b"\n")):
            raise errors.PermissionDenied(
                f"the account proof's signature does not verify: it must sign '{sshsig.ACCOUNT_DOMAIN}\\n{method}"
                f"\\n{username}\\n{proof.epoch}\\n{proof.nonce}' with the account's key"
            )
        if not await self.replay.first_use(hashlib.sha256(message).hexdigest(), self.replay_ttl):
            raise errors.PermissionDenied("this account proof was already used: make a fresh one for each request")
