"""Escape attempts: each is refused, and the refusal is logged."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import pytest

from tests.helpers import wait_until_async
from tests.ssh.conftest import SshEnv, SshFactory


@pytest.fixture
async def env(ssh_factory: SshFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> SshEnv:
    caplog.set_level(logging.INFO)
    env = await ssh_factory()
    await env.enable("alice")
    await env.enable("bob")
    (env.home("bob") / "bob-secret.txt").write_text("bob's\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret\n")
    # planted on the server side: links pointing out of alice's home
    os.symlink(outside, env.home("alice") / "out")
    os.symlink(outside / "secret.txt", env.home("alice") / "secret-link")
    os.symlink("../bob", env.home("alice") / "to-bob")
    (env.home("alice") / "mine.txt").write_text("mine\n")
    return env


def refusals(caplog: pytest.LogCaptureFixture, kind: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "services.ssh.audit" and f"refused {kind}" in r.msg % r.args
    ]


async def test_dotdot_and_absolute_paths_stay_in_the_home(env: SshEnv, tmp_path: Path) -> None:
    got = tmp_path / "got"
    # '..' from the root is the root: the listing is alice's home, not the homes folder
    res = await env.sftp("alice", "cd ..\ncd ..\npwd\nls -1\n")
    assert res.rc == 0, res
    assert "Remote working directory: /" in res.out
    assert res.out.split("sftp> ls -1\n")[1].split() == ["mine.txt", "out", "secret-link", "to-bob"]
    for path in ("../bob/bob-secret.txt", "/../../bob/bob-secret.txt", f"{env.home('bob')}/bob-secret.txt"):
        res = await env.sftp("alice", f"get {path} {got}\n")
        assert res.rc != 0 and not got.exists(), res
    res = await env.sftp("alice", "get /etc/hostname\n")
    assert res.rc != 0 and "not found" in res.err.lower(), res
    # a write "outside" lands inside the home
    src = tmp_path / "x.txt"
    src.write_text("x")
    res = await env.sftp("alice", f"put {src} ../../x.txt\n")
    assert res.rc == 0, res
    assert (env.home("alice") / "x.txt").read_text() == "x"
    assert not (env.home("alice").parent / "x.txt").exists()


async def test_existing_symlinks_out_are_not_followed(
    env: SshEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outside = tmp_path / "outside"
    got = tmp_path / "got"
    src = tmp_path / "new.txt"
    src.write_text("new")
    attempts = [
        f"get out/secret.txt {got}",  # through a folder link
        f"get secret-link {got}",  # a file link
        f"get to-bob/bob-secret.txt {got}",  # relative link to another home
        "cd out",
        f"put {src} out/new.txt",
        "rename mine.txt out/mine.txt",
        "mkdir out/newdir",
        "rm out/secret.txt",
        "chmod 777 secret-link",
    ]
    for cmd in attempts:
        res = await env.sftp("alice", cmd + "\n")
        assert res.rc != 0, (cmd, res)
        assert not got.exists() and "top secret" not in res.out
    listing = await env.sftp("alice", "ls -l out/\nls -l to-bob/\n")
    assert "secret.txt" not in listing.out and "bob-secret" not in listing.out, listing  # shown as links only
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "top secret\n"
    assert oct((outside / "secret.txt").stat().st_mode & 0o777) != oct(0o777)
    assert (env.home("alice") / "mine.txt").exists()
    assert len(refusals(caplog, "escape")) >= len(attempts)
    # the links themselves can be listed and removed
    res = await env.sftp("alice", "ls -l\nrm secret-link\n")
    assert res.rc == 0, res
    assert not (env.home("alice") / "secret-link").is_symlink()


async def test_symlink_creation_refused_sftp_and_rsync_munged(
    env: SshEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    res = await env.sftp("alice", "symlink /etc/passwd pw\n")
    assert res.rc != 0 and "unsupported" in res.err.lower(), res
    res = await env.sftp("alice", "ln mine.txt hard\n")
    assert res.rc != 0, res
    assert sorted(p.name for p in env.home("alice").iterdir()) == ["mine.txt", "out", "secret-link", "to-bob"]
    assert refusals(caplog, "symlink") and refusals(caplog, "link")
    # rsync stores symlinks munged: the kernel cannot follow them, SFTP does not either
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("/etc/passwd", src / "pw")
    os.symlink(tmp_path / "outside", src / "dir")
    push = await env.rsync("-a", f"{src}/", "alice@127.0.0.1:r/")
    assert push.rc == 0, push
    stored = os.readlink(env.home("alice") / "r" / "pw")
    assert stored.startswith("/rsyncd-munged/")
    got = tmp_path / "got"
    for cmd in (f"get r/pw {got}", f"get r/dir/secret.txt {got}"):
        res = await env.sftp("alice", cmd + "\n")
        assert res.rc != 0 and not got.exists(), res
    # pulling gives the original link back
    back = tmp_path / "back"
    pull = await env.rsync("-a", "alice@127.0.0.1:r/", f"{back}/")
    assert pull.rc == 0, pull
    assert os.readlink(back / "pw") == "/etc/passwd"


async def test_rsync_cannot_leave_the_home(env: SshEnv, tmp_path: Path) -> None:
    dest = tmp_path / "d"
    for remote in ("alice@127.0.0.1:../bob/", "alice@127.0.0.1:/etc/hostname", "alice@127.0.0.1:out/"):
        res = await env.rsync("-a", remote, f"{dest}/")
        assert res.rc != 0, (remote, res)
    assert not (dest / "bob-secret.txt").exists() and not (dest / "secret.txt").exists()
    res = await env.rsync("-aL", "alice@127.0.0.1:secret-link", f"{dest}/")
    assert res.rc != 0, res
    assert "rrsync error" in res.err or "error" in res.err


async def test_shell_exec_subsystem_refused(env: SshEnv, caplog: pytest.LogCaptureFixture) -> None:
    shell = await env.ssh("alice", "-T")
    assert shell.rc == 1 and "no shell" in shell.err, shell
    for cmd in ("cat /etc/passwd", "sh -c id", "rsync --version", "/usr/bin/rsync --server . /", "true"):
        res = await env.ssh("alice", "-T", cmd=(cmd,))
        assert res.rc != 0, (cmd, res)
    sub = await env.ssh("alice", "-s", cmd=("netconf",))
    assert sub.rc == 1 and "not available" in sub.err, sub
    pty = await env.ssh("alice", "-tt", cmd=("id",))
    assert pty.rc != 0, pty
    assert refusals(caplog, "shell") and refusals(caplog, "exec") and refusals(caplog, "subsystem")


async def test_forwarding_refused(env: SshEnv, caplog: pytest.LogCaptureFixture) -> None:
    stdio = await env.ssh("alice", "-W", f"127.0.0.1:{env.port}")
    assert stdio.rc != 0 and "forwarding failed" in stdio.err, stdio
    remote = await env.ssh("alice", "-N", "-oExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22")
    assert remote.rc == 255 and "forwarding failed" in remote.err, remote
    # -L: the listener is the client's; a connection through it is refused by the server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    dest = "alice@127.0.0.1"
    args = ["ssh", "-p", str(env.port), *env.opts("alice"), "-N", "-L", f"{local}:127.0.0.1:{env.port}", dest]
    proc = await asyncio.create_subprocess_exec(*args, stderr=asyncio.subprocess.PIPE)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection("127.0.0.1", local)
        except OSError:
            return None  # ssh -L is not listening yet

    try:
        reader, writer = await wait_until_async(connect, f"ssh -L to listen on port {local}")
        assert await asyncio.wait_for(reader.read(100), 10) == b""  # closed: no SSH banner came through
        writer.close()
    finally:
        proc.terminate()
        await proc.communicate()
    assert len(refusals(caplog, "forward")) == 3
    assert any(f"forwarding to 127.0.0.1:{env.port}" in m for m in refusals(caplog, "forward"))


async def test_logins_refused(env: SshEnv, caplog: pytest.LogCaptureFixture) -> None:
    ok = await env.sftp("alice", "pwd\n")
    assert ok.rc == 0, ok
    # password login is never offered
    pw = await env.ssh("alice", "-oPubkeyAuthentication=no", "-oPreferredAuthentications=password")
    assert pw.rc == 255 and "Permission denied (publickey)" in pw.err, pw
    # another user's home with alice's key, an unknown user, an unknown key: the same answer
    for user, key in (("bob", "alice"), ("nobody", "alice"), ("alice", "mallory")):
        res = await env.sftp(user, "pwd\n", key=key)
        assert res.rc == 255 and "Permission denied (publickey)" in res.err, (user, key, res)
    messages = [r.getMessage() for r in caplog.records if r.name == "services.ssh.server"]
    assert any("login refused: key not accepted" in m for m in messages)
    assert any("login refused: unknown user" in m for m in messages)
    assert any("closed without a login" in m for m in messages)
