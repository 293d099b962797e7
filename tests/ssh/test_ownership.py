"""SSH accounts belong to someone: in every mode, nobody changes, reads, sizes, processes or removes an
account that is not theirs (real ssh service and redis; real OpenSSH sftp and ssh-keygen -Y sign).

Public and secret modes: an existing account is managed with a proof signed by its current SSH key
(or the admin token). Allowlist mode: by the identity that created it (or an admin), and an account
without an owner by its key, whose prover becomes its owner.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from nacl.signing import SigningKey

from gridstor.v1 import ssh_pb2
from services.common import sshsig
from services.common.keys import signing_key
from services.common.rpc import admin_token
from tests.helpers import bearer, login_token, run_program
from tests.ssh.conftest import Keys, SshEnv, SshFactory

MiB = 1024 * 1024
SECRET = "ownership-test-secret-42"
IDENTITIES = ("alice", "mallory", "ops")
ALLOWLIST = {name: SigningKey.generate().verify_key.encode().hex() for name in IDENTITIES}
MODES: dict[str, dict[str, Any]] = {
    "public": {},
    "secret": {"mode": "secret", "secret": SECRET},
    "allowlist": {"mode": "allowlist", "allowlist": ALLOWLIST, "admins": ["ops"]},
}
NOT_YOURS = (
    "SSH account 'alice' exists and is not yours to {verb}: prove you hold its SSH key (gridstor ssh {command}"
    " alice -i KEY, or an AccountProof signed with `ssh-keygen -Y sign -n gridstor-ssh-account`; see"
    " docs/security.md), or use an admin token"
)
OTHER_OWNER = "SSH account 'alice' belongs to another identity: only its owner or an admin may {verb} it"
VERBS = {
    "EnableAccount": ("change", "enable"),
    "DisableAccount": ("disable or remove", "disable"),
    "HomeSize": ("read the size of", "size"),
    "Process": ("process the home of", "process"),
}


def as_(env: SshEnv, identity: str) -> tuple[tuple[str, str], ...]:
    """Call metadata of ``identity``'s login token (none in public mode, where anyone may call)."""
    return () if env.cfg.mode == "public" else bearer(login_token(env.cfg, identity))


def admin(env: SshEnv) -> tuple[tuple[str, str]]:
    return bearer(admin_token(signing_key(env.cfg.data_dir), "ops"))


Call = Callable[[ssh_pb2.AccountProof | None, Any], Awaitable[Any]]


def calls(env: SshEnv, key: str) -> dict[str, Call]:
    """Each SshService method on alice's account, as a caller holding SSH key ``key`` would try it."""
    stub = env.stub
    return {
        "EnableAccount": lambda proof, md: stub.EnableAccount(
            ssh_pb2.EnableAccountRequest(username="alice", public_key=env.keys.public(key), max_size_mb=1, proof=proof),
            metadata=md,
        ),
        "HomeSize": lambda proof, md: stub.HomeSize(
            ssh_pb2.HomeSizeRequest(username="alice", proof=proof), metadata=md
        ),
        "Process": lambda proof, md: stub.Process(
            ssh_pb2.ProcessRequest(username="alice", path="notes.txt", proof=proof), metadata=md
        ),
        "DisableAccount": lambda proof, md: stub.DisableAccount(
            ssh_pb2.DisableAccountRequest(username="alice", remove_home=True, proof=proof), metadata=md
        ),
    }


async def refused(aw: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await aw
    return info.value.code(), info.value.details() or ""


async def alice_with_a_file(env: SshEnv, tmp_path: Path) -> None:
    """alice makes her account (as herself) and stores notes.txt in it over SFTP."""
    reply = await env.stub.EnableAccount(
        ssh_pb2.EnableAccountRequest(username="alice", public_key=env.keys.public("alice"), max_size_mb=8),
        metadata=as_(env, "alice"),
    )
    assert reply.created
    assert reply.owner == ("alice" if env.cfg.mode == "allowlist" else "")  # only a proven identity owns
    notes = tmp_path / "notes.txt"
    notes.write_text("alice's notes\n")
    assert (await env.sftp("alice", f"put {notes} notes.txt\n")).rc == 0


async def alice_is_intact(env: SshEnv, tmp_path: Path) -> None:
    """alice still logs in with her key and reads her file; mallory's key does not open her home."""
    back = tmp_path / "back.txt"
    res = await env.sftp("alice", f"get notes.txt {back}\n")
    assert res.rc == 0, res
    assert back.read_text() == "alice's notes\n"
    stolen = await env.sftp("alice", "ls\n", key="mallory")  # real OpenSSH sftp with mallory's key
    assert stolen.rc == 255 and "Permission denied (publickey)" in stolen.err, stolen


@pytest.mark.parametrize("mode", MODES)
async def test_nobody_takes_over_another_users_account(ssh_factory: SshFactory, tmp_path: Path, mode: str) -> None:
    env = await ssh_factory(**MODES[mode])
    await alice_with_a_file(env, tmp_path)
    mallory = as_(env, "mallory")
    for method, call in calls(env, "mallory").items():
        verb, command = VERBS[method]
        # without a proof
        code, message = await refused(call(None, mallory))
        expected = OTHER_OWNER if mode == "allowlist" else NOT_YOURS
        assert (code, message) == (grpc.StatusCode.PERMISSION_DENIED, expected.format(verb=verb, command=command))
        # with a proof made with mallory's own key
        code, message = await refused(call(env.keys.proof("mallory", method, "alice"), mallory))
        if mode == "allowlist":
            assert message == OTHER_OWNER.format(verb=verb)  # the key proves nothing against an owner
        else:
            assert message == (
                "the account proof is signed with another key than SSH account 'alice' has: sign with the private"
                " key of its current public key"
            )
        assert code == grpc.StatusCode.PERMISSION_DENIED
    await alice_is_intact(env, tmp_path)
    assert (env.home("alice") / "notes.txt").exists()
    # the service keeps serving: mallory may still make an account of her own
    own = await env.stub.EnableAccount(
        ssh_pb2.EnableAccountRequest(username="mallory", public_key=env.keys.public("mallory"), max_size_mb=1),
        metadata=mallory,
    )
    assert own.created


@pytest.mark.parametrize("mode", MODES)
async def test_the_owner_and_the_admin_manage_the_account(ssh_factory: SshFactory, tmp_path: Path, mode: str) -> None:
    env = await ssh_factory(**MODES[mode])
    await alice_with_a_file(env, tmp_path)
    alice = as_(env, "alice")

    def proof(method: str) -> ssh_pb2.AccountProof | None:
        """allowlist: alice's identity is enough; elsewhere she proves she holds the account's key."""
        return None if mode == "allowlist" else env.keys.proof("alice", method, "alice")

    size = await env.stub.HomeSize(ssh_pb2.HomeSizeRequest(username="alice", proof=proof("HomeSize")), metadata=alice)
    assert (size.used_bytes, size.files, size.max_bytes) == (4096, 1, 8 * MiB)  # a 14-byte file takes a block
    grown = await env.stub.EnableAccount(
        ssh_pb2.EnableAccountRequest(
            username="alice", public_key=env.keys.public("alice"), max_size_mb=16, proof=proof("EnableAccount")
        ),
        metadata=alice,
    )
    assert (grown.created, grown.max_bytes) == (False, 16 * MiB)
    # The admin token manages every account, in every mode, without a proof.
    size = await env.stub.HomeSize(ssh_pb2.HomeSizeRequest(username="alice"), metadata=admin(env))
    assert size.max_bytes == 16 * MiB
    if mode == "allowlist":  # ... and so does an identity the allowlist config names in admins
        size = await env.stub.HomeSize(ssh_pb2.HomeSizeRequest(username="alice"), metadata=as_(env, "ops"))
        assert size.owner == "alice"
    # Changing the key needs the current one; afterwards only the new key opens the home.
    swapped = await env.stub.EnableAccount(
        ssh_pb2.EnableAccountRequest(username="alice", public_key=env.keys.public("bob"), proof=proof("EnableAccount")),
        metadata=alice,
    )
    assert (swapped.created, swapped.max_bytes) == (False, 16 * MiB)
    assert (await env.sftp("alice", "ls\n")).rc == 255
    assert (await env.sftp("alice", "ls\n", key="bob")).rc == 0
    if mode != "allowlist":  # the old key proves nothing any more
        code, message = await refused(
            env.stub.HomeSize(
                ssh_pb2.HomeSizeRequest(username="alice", proof=env.keys.proof("alice", "HomeSize", "alice")),
                metadata=alice,
            )
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "signed with another key" in message
    gone = await env.stub.DisableAccount(
        ssh_pb2.DisableAccountRequest(username="alice", remove_home=True), metadata=admin(env)
    )
    assert (gone.existed, gone.home_removed) == (True, True)


async def test_proofs_are_checked_and_work_once(ssh_factory: SshFactory, tmp_path: Path) -> None:
    env = await ssh_factory()  # public mode: the proof is the only thing standing between users
    await alice_with_a_file(env, tmp_path)

    def size(proof: ssh_pb2.AccountProof) -> Awaitable[ssh_pb2.HomeSizeReply]:
        reply: Awaitable[ssh_pb2.HomeSizeReply] = env.stub.HomeSize(
            ssh_pb2.HomeSizeRequest(username="alice", proof=proof)
        )
        return reply

    good = await openssh_proof(env.keys, "alice", "HomeSize", "alice", tmp_path)  # made by ssh-keygen -Y sign
    assert (await size(good)).files == 1
    assert await refused(size(good)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "this account proof was already used: make a fresh one for each request",
    )
    stale = env.keys.proof("alice", "HomeSize", "alice", epoch=int(time.time()) - 3600)
    code, message = await refused(size(stale))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert message.startswith(f"the account proof's epoch {stale.epoch} is 36")
    assert "the gateway accepts 60 s either side of its clock" in message
    for_other_method = env.keys.proof("alice", "Process", "alice")
    code, message = await refused(size(for_other_method))
    assert (code, message) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "the account proof's signature does not verify: it must sign 'gridstor/v1/ssh-account\\nHomeSize\\nalice\\n"
        f"{for_other_method.epoch}\\n{for_other_method.nonce}' with the account's key",
    )
    other_namespace = await openssh_proof(env.keys, "alice", "HomeSize", "alice", tmp_path, namespace="file")
    assert await refused(size(other_namespace)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the account proof is signed for namespace 'file'; sign with -n gridstor-ssh-account",
    )
    fresh = env.keys.proof("alice", "HomeSize", "alice")
    for signature, message in [
        ("", "the signature is empty"),
        ("not base64!", "the signature is not base64 (give the armored text ssh-keygen -Y sign prints)"),
        ("AAAA", "the signature is not an SSH signature (SSHSIG)"),
    ]:
        bad = ssh_pb2.AccountProof(epoch=fresh.epoch, nonce=fresh.nonce, signature=signature)
        assert await refused(size(bad)) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    bad_nonce = ssh_pb2.AccountProof(epoch=fresh.epoch, nonce="short", signature=fresh.signature)
    assert await refused(size(bad_nonce)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the account proof's nonce must be 8-64 of letters, digits, '-' and '_'",
    )
    assert (await size(fresh)).files == 1  # still serving; the refused attempts used nothing up


async def openssh_proof(
    keys: Keys, key: str, method: str, username: str, tmp: Path, namespace: str = sshsig.ACCOUNT_NAMESPACE
) -> ssh_pb2.AccountProof:
    """An account proof made the way a user without the CLI makes it: printf ... | ssh-keygen -Y sign."""
    epoch, nonce = int(time.time()), "n" + str(time.monotonic_ns())
    message = tmp / f"proof-{nonce}.txt"
    message.write_bytes(sshsig.account_message(method, username, epoch, nonce))
    res = await run_program("ssh-keygen", "-q", "-Y", "sign", "-f", keys.path(key), "-n", namespace, message)
    assert res.rc == 0, res
    signature = message.with_name(message.name + ".sig").read_text()
    assert signature.startswith("-----BEGIN SSH SIGNATURE-----")
    return ssh_pb2.AccountProof(epoch=epoch, nonce=nonce, signature=signature)


@pytest.mark.parametrize("mode", MODES)
async def test_process_refuses_a_disabled_account(ssh_factory: SshFactory, tmp_path: Path, mode: str) -> None:
    env = await ssh_factory(**MODES[mode])
    await alice_with_a_file(env, tmp_path)
    await env.stub.DisableAccount(ssh_pb2.DisableAccountRequest(username="alice"), metadata=admin(env))
    process = ssh_pb2.ProcessRequest(username="alice", path="notes.txt")
    assert await refused(env.stub.Process(process, metadata=admin(env))) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SSH account 'alice' is disabled: enable it again before processing its home",
    )
    assert (env.home("alice") / "notes.txt").exists() and not list(env.cfg.spool_dir.iterdir())
    size = await env.stub.HomeSize(ssh_pb2.HomeSizeRequest(username="alice"), metadata=admin(env))
    assert (size.enabled, size.files) == (False, 1)  # still serving


async def test_an_account_without_owner_is_claimed_with_its_key(ssh_factory: SshFactory, tmp_path: Path) -> None:
    """Made in public mode (no owner); the gateway then runs in allowlist mode on the same data dir."""
    first = await ssh_factory()
    await alice_with_a_file(first, tmp_path)
    await first.svc.cleanup()
    env = await ssh_factory(data=first.cfg.data_dir, **MODES["allowlist"])
    mallory = as_(env, "mallory")
    size = ssh_pb2.HomeSizeRequest(username="alice")
    code, message = await refused(env.stub.HomeSize(size, metadata=mallory))
    assert (code, message) == (
        grpc.StatusCode.PERMISSION_DENIED,
        NOT_YOURS.format(verb="read the size of", command="size"),
    )
    # alice's identity proves nothing about an account she did not create as that identity: her key does
    proof = env.keys.proof("alice", "EnableAccount", "alice")
    claimed = await env.stub.EnableAccount(
        ssh_pb2.EnableAccountRequest(username="alice", public_key=env.keys.public("alice"), proof=proof),
        metadata=as_(env, "alice"),
    )
    assert (claimed.created, claimed.owner) == (False, "alice")
    # now the owner needs no proof, and the key alone no longer convinces for another identity
    assert (await env.stub.HomeSize(size, metadata=as_(env, "alice"))).owner == "alice"
    with_key = ssh_pb2.HomeSizeRequest(username="alice", proof=env.keys.proof("alice", "HomeSize", "alice"))
    assert await refused(env.stub.HomeSize(with_key, metadata=mallory)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        OTHER_OWNER.format(verb="read the size of"),
    )
    await alice_is_intact(env, tmp_path)


async def test_two_creators_of_one_name_cannot_both_win(ssh_factory: SshFactory) -> None:
    env = await ssh_factory()
    requests = [
        ssh_pb2.EnableAccountRequest(username="carol", public_key=env.keys.public(k), max_size_mb=1)
        for k in ("alice", "mallory")
    ]
    results = await asyncio.gather(*(env.stub.EnableAccount(r) for r in requests), return_exceptions=True)
    won = [i for i, r in enumerate(results) if isinstance(r, ssh_pb2.EnableAccountReply)]
    assert len(won) == 1, results
    lost = results[1 - won[0]]
    assert isinstance(lost, grpc.aio.AioRpcError)
    assert (lost.code(), lost.details()) in {
        (grpc.StatusCode.ABORTED, "SSH account 'carol' was created while this request was checked; try again"),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            NOT_YOURS.replace("alice", "carol").format(verb="change", command="enable"),
        ),
    }
    winner = ("alice", "mallory")[won[0]]
    assert (await env.sftp("carol", "pwd\n", key=winner)).rc == 0
    assert (await env.sftp("carol", "pwd\n", key=("alice", "mallory")[1 - won[0]])).rc == 255
