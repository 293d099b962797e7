"""A home's limits against every client: quota overshoot measured per client, entries, open-deleted files, rsync's
options; after each test the homes keep their mode and owner, hold no set-id bits or foreign owners, and nothing
outside them changed.

Overshoot: ``Home.peak`` is the most a home held at any change the service saw (every SFTP write, every file an
rsync process finished or was stopped in); a client's overshoot is ``peak - max_bytes``, which must stay within
``OVERSHOOT_BOUND`` (docs/ssh.md). The measured figures are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from services.common import homes
from services.ssh.home import OVERSHOOT_BOUND, Home
from tests.helpers import run_program, wait_until_async
from tests.ssh.conftest import SshEnv, SshFactory, need, processes_in

KiB = 1024
MiB = 1024 * KiB
HOME_MB = 4


@pytest.fixture
async def env(ssh_factory: SshFactory, tmp_path: Path) -> AsyncIterator[SshEnv]:
    """alice with a 4 MiB home; a folder outside every home that must not change."""
    env = await ssh_factory()
    await env.enable("alice", mb=HOME_MB)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    yield env
    env.check_homes()
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "keep\n" and stat.S_IMODE(outside.stat().st_mode) == 0o755


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def home_of(env: SshEnv, user: str = "alice") -> Home:
    return env.svc.gateway.home(user)


async def overshoot(env: SshEnv, client: str, user: str = "alice") -> int:
    """What ``client`` took the home past its limit (at the peak the service saw; also on disk now); printed.

    The client may exit before the service has ended its side of the session: first wait for that.
    """
    home = home_of(env, user)
    await wait_until_async(
        lambda: not home.grants and not processes_in(home.root), "the server side of the session to end"
    )
    on_disk = homes.usage(home.root).bytes
    over = max(0, home.peak - home.max_bytes, on_disk - home.max_bytes)
    print(f"\n  overshoot {client}: {over} bytes (peak {home.peak}, on disk now {on_disk}, limit {home.max_bytes})")
    assert over <= OVERSHOOT_BOUND, (client, over)
    return over


def no_server_paths(env: SshEnv, text: str) -> None:
    for local in (str(env.svc.settings.homes_dir), str(env.cfg.data_dir), "/proc/self/fd", "rrsync.py"):
        assert local not in text, (local, text)


async def reset_peak(env: SshEnv) -> None:
    home = home_of(env)
    await home.refresh(force=True)
    home.peak = home.held


# ---------------------------------------------------------------------- rsync


async def test_rsync_push_stops_at_the_quota(env: SshEnv, tmp_path: Path) -> None:
    """A 20 MiB file into a 4 MiB home: stopped at the limit, not after 20 MiB; the error names the quota."""
    big = random_file(tmp_path / "src" / "big.bin", 20 * MiB)
    await reset_peak(env)
    push = await env.rsync(str(big), "alice@127.0.0.1:")
    assert push.rc != 0, push
    assert "quota exceeded: home holds" in push.err and f"of {HOME_MB * MiB} bytes" in push.err, push
    no_server_paths(env, push.err)
    await overshoot(env, "rsync (one 20 MiB file)")
    assert not (env.home("alice") / "big.bin").exists()  # rsync removed its partial copy


async def test_rsync_append_and_inplace_stop_at_the_quota(env: SshEnv, tmp_path: Path) -> None:
    start = random_file(tmp_path / "src" / "app.bin", 1 * MiB)
    assert (await env.rsync(str(start), "alice@127.0.0.1:")).rc == 0
    with start.open("ab") as f:
        f.write(os.urandom(10 * MiB))
    await reset_peak(env)
    # the destination is the folder: this rrsync fails on an existing single-file destination (docs/ssh.md)
    grown = await env.rsync("--append", str(start), "alice@127.0.0.1:")
    assert grown.rc != 0 and "quota exceeded: home holds" in grown.err, grown
    no_server_paths(env, grown.err)
    await overshoot(env, "rsync --append")
    stored = env.home("alice") / "app.bin"
    assert HOME_MB * MiB - 64 * KiB <= stored.stat().st_size <= HOME_MB * MiB
    assert stored.read_bytes() == start.read_bytes()[: stored.stat().st_size]  # what was appended is right

    other = random_file(tmp_path / "src2" / "app.bin", 12 * MiB)
    await reset_peak(env)
    inplace = await env.rsync("--inplace", str(other), "alice@127.0.0.1:")
    assert inplace.rc != 0 and "quota exceeded: home holds" in inplace.err, inplace
    await overshoot(env, "rsync --inplace")


async def test_rsync_many_files_stop_at_the_quota(env: SshEnv, tmp_path: Path) -> None:
    src = tmp_path / "many"
    for i in range(40):
        random_file(src / f"d{i % 4}" / f"f{i:02}", 256 * KiB)
    await reset_peak(env)
    push = await env.rsync("-r", f"{src}/", "alice@127.0.0.1:many/")
    assert push.rc != 0 and "quota exceeded: home holds" in push.err, push
    no_server_paths(env, push.err)
    await overshoot(env, "rsync (40 files of 256 KiB)")
    kept = [p for p in (env.home("alice") / "many").rglob("f*")]
    assert 10 <= len(kept) < 16  # what fits in 4 MiB, folders' blocks included


async def test_rsync_updates_and_deletes_free_what_they_replace(env: SshEnv, tmp_path: Path) -> None:
    """Half full: new copies of every file, then a tree replacing it (--delete) fit, since what they replace
    is counted as freed the moment rsync renames over it or deletes it."""
    src = tmp_path / "tree"
    for name in ("a.bin", "b.bin"):
        random_file(src / name, MiB)
    assert (await env.rsync("-a", f"{src}/", "alice@127.0.0.1:t/")).rc == 0
    for name in ("a.bin", "b.bin"):  # new contents: rsync writes a new copy of each, then renames it over
        random_file(src / name, MiB)
    await reset_peak(env)
    again = await env.rsync("-a", "--no-whole-file", f"{src}/", "alice@127.0.0.1:t/")
    assert again.rc == 0, again
    other = tmp_path / "other"
    for name in ("c.bin", "d.bin"):
        random_file(other / name, MiB)
    replaced = await env.rsync("-a", "--delete", f"{other}/", "alice@127.0.0.1:t/")
    assert replaced.rc == 0, replaced
    assert sorted(p.name for p in (env.home("alice") / "t").iterdir()) == ["c.bin", "d.bin"]
    await overshoot(env, "rsync updates and --delete in a half-full home")
    assert home_of(env).held == homes.usage(env.home("alice")).bytes  # counted exactly, no recount needed


async def test_rsync_cannot_set_modes_owners_or_set_id_bits(env: SshEnv, tmp_path: Path) -> None:
    """-a of a 0777 folder with a setuid file, a setgid folder, a foreign owner and a trusted.* attribute."""
    src = tmp_path / "tree"
    (src / "shared").mkdir(parents=True)
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    os.chown(src / "tool", 4321, 4321)
    os.chmod(src / "tool", 0o4755)  # after chown, which clears set-id bits
    os.chmod(src / "shared", 0o2777)
    os.chmod(src, 0o777)
    os.setxattr(src / "tool", "trusted.note", b"root only")
    os.setxattr(src / "tool", "user.note", b"anyone")
    for options in (["-a"], ["-aXH", "--numeric-ids"], ["-a", "--super", "--chown=0:0"], ["-a", "--fake-super"]):
        push = await env.rsync(*options, f"{src}/", "alice@127.0.0.1:")
        assert push.rc == 0, (options, push)
        env.check_homes()  # 0700 and ours; no set-id bits, no foreign owners anywhere
    tool = env.home("alice") / "tool"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o755 and (env.home("alice") / "shared").stat().st_mode & 0o777 == 0o777
    assert "trusted.note" not in os.listxattr(tool) and os.getxattr(tool, "user.note") == b"anyone"
    pulled = tmp_path / "pulled"
    assert (await env.rsync("-a", "alice@127.0.0.1:", f"{pulled}/")).rc == 0
    assert (pulled / "tool").read_bytes() == b"#!/bin/sh\n"


# ----------------------------------------------------------- sftp, scp, rclone, restic


async def test_sftp_and_scp_stop_at_the_quota(env: SshEnv, tmp_path: Path) -> None:
    big = random_file(tmp_path / "big.bin", 20 * MiB)
    await reset_peak(env)
    put = await env.sftp("alice", f"put {big} sftp.bin\n")
    assert put.rc != 0, put
    await overshoot(env, "sftp put")
    assert (await env.sftp("alice", "rm sftp.bin\n")).rc == 0
    for legacy in (False, True):
        await reset_peak(env)
        res = await env.scp(str(big), "alice@127.0.0.1:scp.bin", legacy=legacy)
        assert res.rc != 0, res
        no_server_paths(env, res.err)
        await overshoot(env, "scp -O" if legacy else "scp (SFTP mode)")
        assert (await env.sftp("alice", "rm scp.bin\n")).rc == 0


async def test_rclone_stops_at_the_quota(env: SshEnv, tmp_path: Path) -> None:
    need("rclone")
    src = tmp_path / "src"
    random_file(src / "big.bin", 20 * MiB)
    await reset_peak(env)
    retries = ["--retries=1", "--low-level-retries=1"]
    up = await run_program("rclone", "copy", *retries, *env.rclone_remote(), str(src), ":sftp:rc")
    assert up.rc != 0, up
    assert 'sftp: "quota exceeded: home holds' in up.err or "cannot be larger than the home" in up.err, up
    await overshoot(env, "rclone copy")


async def test_restic_stops_at_the_quota(env: SshEnv, tmp_path: Path) -> None:
    """restic retries a refused pack for about a minute before it gives up: measured at its first refusal."""
    need("restic")
    restic_env = {"RESTIC_PASSWORD": "correct horse battery", "RESTIC_CACHE_DIR": str(tmp_path / "cache")}
    init = await run_program(*env.restic(), "init", env=restic_env)
    assert init.rc == 0, init
    data = tmp_path / "data"
    random_file(data / "a.bin", 6 * MiB)
    random_file(data / "b.bin", 6 * MiB)
    await reset_peak(env)
    proc = await asyncio.create_subprocess_exec(
        *env.restic(), "backup", str(data), stderr=asyncio.subprocess.PIPE, env={**os.environ, **restic_env}
    )
    assert proc.stderr is not None
    seen = b""
    try:
        while b"quota exceeded" not in seen:
            line = await asyncio.wait_for(proc.stderr.readline(), 120)
            if not line:
                break
            seen += line
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.communicate()  # to its end: the pipe closed, nothing left for the garbage collector
    assert b"quota exceeded: home holds" in seen, seen
    await overshoot(env, "restic backup")


# ------------------------------------------------------------------ what a home holds


async def test_removed_files_count_while_a_handle_keeps_them_open(env: SshEnv) -> None:
    """Write, remove, keep the handle, repeat: the disk keeps those bytes, and so does the count."""
    chunk = os.urandom(MiB)
    async with env.client() as conn, conn.start_sftp_client() as sftp:
        held = []
        for i in range(3):
            f = await sftp.open(f"gone{i}.bin", "wb")
            await f.write(chunk)
            await sftp.remove(f"gone{i}.bin")
            held.append(f)
        size = await env.size("alice")
        assert size.used_bytes >= 3 * MiB and size.files == 0, size
        assert homes.usage(env.home("alice")).bytes == 0  # nothing has a name, yet the disk holds 3 MiB
        f = await sftp.open("more.bin", "wb")
        with pytest.raises(asyncssh.SFTPError, match="quota exceeded: home holds"):
            await f.write(os.urandom(2 * MiB))
        await f.close()
        await overshoot(env, "sftp write+remove, handles kept open")
        await sftp.remove("more.bin")
        for f in held:
            await f.close()
        size = await env.size("alice")
        assert size.used_bytes == 0, size
        big = await sftp.open("fits-now.bin", "wb")
        await big.write(os.urandom(2 * MiB))
        await big.close()


async def test_blocks_not_sizes(env: SshEnv) -> None:
    """A sparse file counts its blocks; a 1-byte file its block; a folder its block."""
    async with env.client() as conn, conn.start_sftp_client() as sftp:
        async with sftp.open("sparse.bin", "wb") as f:
            await f.write(b"x", HOME_MB * MiB - 1)  # a 4 MiB file holding one block
        async with sftp.open("tiny.txt", "wb") as f:
            await f.write(b"t")
        await sftp.mkdir("folder")
        size = await env.size("alice")
        assert size.used_bytes == 3 * 4 * KiB and size.entries == 3 and size.files == 2, size
        await reset_peak(env)
        async with sftp.open("sparse.bin", "r+b") as f:  # filling its holes counts
            with pytest.raises(asyncssh.SFTPError, match="quota exceeded: home holds"):
                for offset in range(0, HOME_MB * MiB, 256 * KiB):
                    await f.write(os.urandom(256 * KiB), offset)
        with pytest.raises(asyncssh.SFTPError, match="cannot be larger than the home"):
            async with sftp.open("huge.bin", "wb") as f:
                await f.write(b"x", HOME_MB * MiB)
    await overshoot(env, "sftp writes into a sparse file's holes")


async def test_the_entry_limit(ssh_factory: SshFactory, tmp_path: Path) -> None:
    env = await ssh_factory(ssh={"max_entries": 30})
    await env.enable("alice", mb=64)
    batch = "".join(f"mkdir d{i}\n" for i in range(40))
    res = await env.sftp("alice", batch)
    assert res.rc != 0, res
    size = await env.size("alice")
    assert (size.entries, size.max_entries) == (30, 30)
    assert (await env.sftp("alice", "rmdir d0\nrmdir d1\n")).rc == 0
    src = tmp_path / "small"
    for i in range(10):
        random_file(src / f"f{i}", 100)
    push = await env.rsync("-r", f"{src}/", "alice@127.0.0.1:more/")
    assert push.rc != 0 and "entry limit reached: home has" in push.err, push
    size = await env.size("alice")
    assert size.entries <= 30, size
    env.check_homes()


# ------------------------------------------------------------------ resize and cleanup


async def test_resizing_below_what_a_home_holds_says_what_the_sweep_removes(env: SshEnv, tmp_path: Path) -> None:
    for name in ("old.bin", "mid.bin", "new.bin"):
        f = random_file(tmp_path / name, MiB)
        assert (await env.sftp("alice", f"put {f} {name}\n")).rc == 0
    for age, name in ((300, "old.bin"), (200, "mid.bin")):
        t = os.stat(env.home("alice") / name).st_mtime - age
        os.utime(env.home("alice") / name, (t, t))
    reply = await env.enable("alice", mb=2)
    assert reply.max_bytes == 2 * MiB and reply.used_bytes == 3 * MiB, reply
    over = reply.over_limit
    assert (over.files, over.bytes, list(over.paths)) == (1, MiB, ["old.bin"]), over
    assert "home holds 3145728 bytes, over its limit of 2097152" in over.notice and "removes 1 files" in over.notice
    assert (env.home("alice") / "old.bin").exists()  # nothing goes before the sweep
    removed = homes.enforce_quota(env.home("alice"), 2 * MiB)  # what maint's sweep does
    assert [r.path for r in removed] == list(over.paths)
    assert not (await env.enable("alice", mb=HOME_MB)).HasField("over_limit")
