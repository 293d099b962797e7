"""Stock clients against a home: OpenSSH sftp and scp (both modes), rsync, restic, rclone."""

from __future__ import annotations

import asyncio
import filecmp
import json
import os
from pathlib import Path

from services.common import homes
from tests.helpers import run_program, wait_until_async
from tests.ssh.conftest import SshFactory, need, processes_in

KiB = 1024


def tree(root: Path) -> dict[str, bytes | None]:
    """Relative path -> content (None for folders)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(70 * KiB))
    (root / "sub" / "deeper" / "c.dat").write_bytes(os.urandom(1234))
    (root / "empty").mkdir()


async def test_sftp_put_get_mkdir_rename_df(ssh_factory: SshFactory, tmp_path: Path) -> None:
    env = await ssh_factory()
    await env.enable("alice", mb=8)
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(300 * KiB + 7))
    back = tmp_path / "down.bin"
    res = await env.sftp(
        "alice",
        f"mkdir docs\nput {src} docs/up.bin\nrename docs/up.bin docs/moved.bin\nget docs/moved.bin {back}\n"
        "pwd\nls -l docs\ndf\n",
    )
    assert res.rc == 0, res
    assert back.read_bytes() == src.read_bytes()
    assert (env.home("alice") / "docs" / "moved.bin").read_bytes() == src.read_bytes()
    assert "Remote working directory: /" in res.out
    # df shows the home's quota (8 MiB = 8192 KiB) and what is left of it, not the disk
    df_line = res.out.strip().splitlines()[-1].split()
    assert int(df_line[0]) == 8192
    size = await env.size("alice")
    held = homes.usage(env.home("alice")).bytes  # the file's blocks and the folder's
    assert held == 300 * KiB + 4 * KiB + 4 * KiB
    assert int(df_line[2]) == 8192 - held // KiB
    assert (size.used_bytes, size.files, size.max_bytes, size.enabled) == (held, 1, 8 << 20, True)


async def test_scp_both_modes(ssh_factory: SshFactory, tmp_path: Path) -> None:
    env = await ssh_factory()
    await env.enable("alice")
    src = tmp_path / "tree"
    make_tree(src)
    for legacy in (False, True):
        name = "legacy" if legacy else "sftp"
        put = await env.scp(str(src / "sub" / "b.bin"), f"alice@127.0.0.1:{name}.bin", legacy=legacy)
        assert put.rc == 0, put  # SFTP mode exits 0 only with the exit-status fix
        got = tmp_path / f"{name}-back.bin"
        get = await env.scp(f"alice@127.0.0.1:{name}.bin", str(got), legacy=legacy)
        assert get.rc == 0, get
        assert got.read_bytes() == (src / "sub" / "b.bin").read_bytes()
        rec = await env.scp("-r", str(src), f"alice@127.0.0.1:{name}-tree", legacy=legacy)
        assert rec.rc == 0, rec
        assert tree(env.home("alice") / f"{name}-tree") == tree(src)
        down = tmp_path / f"{name}-tree-back"
        rec = await env.scp("-r", f"alice@127.0.0.1:{name}-tree", str(down), legacy=legacy)
        assert rec.rc == 0, rec
        assert tree(down) == tree(src)


async def test_rsync_push_and_pull(ssh_factory: SshFactory, tmp_path: Path) -> None:
    env = await ssh_factory()
    await env.enable("alice")
    src = tmp_path / "src"
    make_tree(src)
    push = await env.rsync("-a", f"{src}/", "alice@127.0.0.1:backup/")
    assert push.rc == 0, push
    assert tree(env.home("alice") / "backup") == tree(src)
    (src / "a.txt").write_bytes(b"changed\n")
    again = await env.rsync("-a", "--delete", f"{src}/", "alice@127.0.0.1:backup/")
    assert again.rc == 0, again
    pulled = tmp_path / "pulled"
    pull = await env.rsync("-a", "alice@127.0.0.1:backup/", f"{pulled}/")
    assert pull.rc == 0, pull
    assert tree(pulled) == tree(src)
    assert (await env.size("alice")).used_bytes == homes.usage(env.home("alice")).bytes


async def test_restic_init_backup_restore(ssh_factory: SshFactory, tmp_path: Path) -> None:
    need("restic")
    env = await ssh_factory()
    await env.enable("alice", mb=64)
    src = tmp_path / "data"
    make_tree(src)
    restic_env = {"RESTIC_PASSWORD": "correct horse battery", "RESTIC_CACHE_DIR": str(tmp_path / "cache")}
    # restic 0.14 has no sftp.args: the whole ssh command goes in sftp.command
    base = ["restic", "-o", f"sftp.command={env.ssh_command('alice')} alice@127.0.0.1 -s sftp"]
    base += ["-r", "sftp:alice@127.0.0.1:/repo", "--no-lock"]
    init = await run_program(*base[:-1], "init", env=restic_env)
    assert init.rc == 0, init
    backup = await run_program(*base[:-1], "backup", str(src), env=restic_env)
    assert backup.rc == 0, backup
    target = tmp_path / "restored"
    restore = await run_program(*base[:-1], "restore", "latest", "--target", str(target), env=restic_env)
    assert restore.rc == 0, restore
    assert tree(target / src.relative_to("/")) == tree(src)
    check = await run_program(*base[:-1], "check", env=restic_env)
    assert check.rc == 0, check
    assert (env.home("alice") / "repo" / "config").is_file()


async def test_rclone_copy_large_file(ssh_factory: SshFactory, tmp_path: Path) -> None:
    """rclone pads its last short write: a file over 32 KiB needs the server-side padding fix."""
    need("rclone")
    env = await ssh_factory()
    await env.enable("alice")
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(1024 * KiB + 12345))
    (src / "small.txt").write_bytes(b"tiny")
    remote = [
        "--sftp-host=127.0.0.1",
        f"--sftp-port={env.port}",
        "--sftp-user=alice",
        f"--sftp-key-file={env.keys.path('alice')}",
        "--sftp-shell-type=none",
        "--config=" + str(tmp_path / "rclone.conf"),
    ]
    up = await run_program("rclone", "copy", *remote, str(src), ":sftp:rc")
    assert up.rc == 0, up
    assert filecmp.cmp(src / "big.bin", env.home("alice") / "rc" / "big.bin", shallow=False)
    down = tmp_path / "down"
    get = await run_program("rclone", "copy", *remote, ":sftp:rc", str(down))
    assert get.rc == 0, get
    assert tree(down) == tree(src)
    about = await run_program("rclone", "about", *remote, ":sftp:", "--json")
    assert about.rc == 0, about
    assert json.loads(about.out)["total"] == 64 << 20  # statvfs@openssh.com answers the home's quota


async def test_rsync_server_side_ends_with_the_client(ssh_factory: SshFactory, tmp_path: Path) -> None:
    env = await ssh_factory()
    await env.enable("alice")
    src = tmp_path / "slow.bin"
    src.write_bytes(os.urandom(4 * 1024 * KiB))
    args = ["rsync", "-e", env.ssh_command("alice"), "--bwlimit=200", str(src), "alice@127.0.0.1:slow.bin"]
    client = await asyncio.create_subprocess_exec(*args)
    await wait_until_async(lambda: processes_in(env.home("alice")), "the server side of rsync in alice's home")
    client.kill()
    await client.wait()
    await wait_until_async(
        lambda: processes_in(env.home("alice")), "the server side of rsync to end", until=lambda pids: pids == []
    )
