"""The gRPC side: EnableAccount / DisableAccount / HomeSize, validation, persistence, tokens."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import grpc
import pytest

from gridstor.v1 import ssh_pb2
from services.common.keys import signing_key
from services.common.rpc import service_token
from tests.helpers import bearer, login_token, run_program, wait_until_async
from tests.ssh.conftest import SshFactory, restart

MiB = 1024 * 1024


async def test_enable_is_idempotent_and_updates(ssh_factory: SshFactory, tmp_path: Path) -> None:
    env = await ssh_factory()
    first = await env.enable("alice", mb=0)
    assert first.created and first.max_bytes == env.svc.settings.default_max_size == 1 << 30
    assert first.host_key_fingerprint == env.svc.host_key_fingerprint and first.host_key_fingerprint.startswith(
        "SHA256:"
    )
    out = await run_program("ssh-keygen", "-lf", env.svc.state_dir / "host_key")
    assert first.host_key_fingerprint in out.out  # what OpenSSH shows when it first connects
    home = env.home("alice")
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    again = await env.enable("alice", mb=0)  # 0 keeps the current size of an existing account
    assert (again.created, again.max_bytes) == (False, 1 << 30)
    sized = await env.enable("alice", mb=5)
    assert (sized.created, sized.max_bytes) == (False, 5 * MiB)
    assert (await env.sftp("alice", "pwd\n")).rc == 0
    # a new key replaces the old one
    swapped = await env.enable("alice", key="bob", mb=0)
    assert (swapped.created, swapped.max_bytes) == (False, 5 * MiB)
    assert (await env.sftp("alice", "pwd\n")).rc == 255
    assert (await env.sftp("alice", "pwd\n", key="bob")).rc == 0
    size = await env.size("alice")
    assert (size.username, size.used_bytes, size.files, size.max_bytes, size.enabled) == ("alice", 0, 0, 5 * MiB, True)


@pytest.mark.parametrize(
    ("username", "key", "mb", "needle"),
    [
        ("Alice", "{good}", 1, "username 'Alice' is not valid"),
        ("1abc", "{good}", 1, "starting with a letter"),
        ("a" * 33, "{good}", 1, "1-32"),
        ("al/ice", "{good}", 1, "not valid"),
        ("", "{good}", 1, "not valid"),
        ("alice", "  ", 1, "public_key is empty"),
        ("alice", "ssh-ed25519 AAAAnotbase64!!", 1, "not an OpenSSH public key"),
        ("alice", "-----BEGIN OPENSSH PRIVATE KEY-----", 1, "PRIVATE key"),
        ("alice", "{good}\n{good}", 1, "single key line"),
        ("alice", "{good}", (1 << 30) + 1, "max_size_mb"),
    ],
)
async def test_enable_validates(ssh_factory: SshFactory, username: str, key: str, mb: int, needle: str) -> None:
    env = await ssh_factory()
    public_key = key.replace("{good}", env.keys.public("alice"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.stub.EnableAccount(
            ssh_pb2.EnableAccountRequest(username=username, public_key=public_key, max_size_mb=mb)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (info.value.details() or ""), info.value.details()
    assert not (env.svc.state_dir / "accounts.json").exists()


async def test_disable_and_remove_home(ssh_factory: SshFactory, tmp_path: Path) -> None:
    env = await ssh_factory()
    await env.enable("alice")
    f = tmp_path / "f"
    f.write_bytes(b"data")
    assert (await env.sftp("alice", f"put {f} f\n")).rc == 0
    reply = await env.disable("alice")
    assert (reply.username, reply.existed, reply.home_removed) == ("alice", True, False)
    assert (await env.sftp("alice", "pwd\n")).rc == 255
    size = await env.size("alice")
    assert (size.enabled, size.used_bytes, size.files) == (False, 4096, 1)  # 4 bytes take a block
    assert (env.home("alice") / "f").read_bytes() == b"data"
    # enabling again keeps the home
    again = await env.enable("alice")
    assert not again.created
    assert (await env.sftp("alice", "get f " + str(tmp_path / "g") + "\n")).rc == 0
    gone = await env.disable("alice", remove_home=True)
    assert (gone.existed, gone.home_removed) == (True, True)
    assert not env.home("alice").exists()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.size("alice")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    nobody = await env.disable("nobody")
    assert (nobody.existed, nobody.home_removed) == (False, False)


async def test_disable_closes_open_sessions(ssh_factory: SshFactory) -> None:
    env = await ssh_factory()
    await env.enable("alice")
    args = ["sftp", "-P", str(env.port), *env.opts("alice"), "-b", "-", "alice@127.0.0.1"]
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    await wait_until_async(lambda: "alice" in env.svc.gateway.connections, "alice's sftp session")
    await env.disable("alice")
    await wait_until_async(lambda: "alice" not in env.svc.gateway.connections, "alice's session to be closed")
    _, err = await asyncio.wait_for(proc.communicate(b"ls\n"), 10)  # the next request finds it closed
    assert proc.returncode != 0, err


async def test_accounts_and_host_key_survive_a_restart(ssh_factory: SshFactory) -> None:
    env = await ssh_factory()
    await env.enable("alice", mb=3)
    await env.enable("bob", key="bob")
    await env.disable("bob")
    fp = env.svc.host_key_fingerprint
    state = env.svc.state_dir
    for name in ("accounts.json", "host_key"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    doc = json.loads((state / "accounts.json").read_text())
    assert sorted(doc["accounts"]) == ["alice", "bob"]
    env = await restart(env)
    assert env.svc.host_key_fingerprint == fp
    alice = await env.size("alice")
    bob = await env.size("bob")
    assert (alice.max_bytes, alice.enabled, bob.enabled) == (3 * MiB, True, False)
    assert (await env.sftp("alice", "pwd\n")).rc == 0
    assert (await env.sftp("bob", "pwd\n")).rc == 255


async def test_damaged_accounts_file_stops_the_start(ssh_factory: SshFactory) -> None:
    from services.common import errors
    from services.ssh import service as ssh_service

    env = await ssh_factory()
    await env.enable("alice")
    await env.svc.cleanup()
    (env.svc.state_dir / "accounts.json").write_text("{not json")
    with pytest.raises(errors.InvalidInput, match=r"accounts file .* is damaged"):
        await ssh_service.start(env.cfg, port=0, ssh_port=0)


async def test_token_required_unless_public(ssh_factory: SshFactory) -> None:
    env = await ssh_factory(mode="secret", secret="a-shared-secret-of-16+")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.enable("alice")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.size("alice")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    md = bearer(login_token(env.cfg, "alice-admin"))
    reply = await env.stub.EnableAccount(
        ssh_pb2.EnableAccountRequest(username="alice", public_key=env.keys.public("alice"), max_size_mb=1),
        metadata=md,
    )
    assert reply.created and reply.owner == ""  # secret mode proves no identity: no owner is recorded
    proof = env.keys.proof("alice", "HomeSize", "alice")
    assert (
        await env.stub.HomeSize(ssh_pb2.HomeSizeRequest(username="alice", proof=proof), metadata=md)
    ).max_bytes == MiB
    svc_md = bearer(service_token(signing_key(env.cfg.data_dir), "maint"))
    assert (await env.stub.HomeSize(ssh_pb2.HomeSizeRequest(username="alice"), metadata=svc_md)).enabled
