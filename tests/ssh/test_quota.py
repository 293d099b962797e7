"""Quota: writes past a home's maximum size fail with a clear message; the home stays consistent.

What a home holds is counted in allocated blocks (the sizes used here are whole blocks).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from services.common import homes
from services.ssh import home as ssh_home
from tests.ssh.conftest import SshFactory

KiB = 1024


async def test_write_past_the_maximum_fails(
    ssh_factory: SshFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    env = await ssh_factory()
    await env.enable("alice", mb=1)
    home = env.home("alice")
    f700 = tmp_path / "f700"
    f700.write_bytes(os.urandom(700 * KiB))
    res = await env.sftp("alice", f"put {f700} a.bin\nput {f700} a.bin\n")  # overwriting frees the old bytes
    assert res.rc == 0, res
    res = await env.sftp("alice", f"put {f700} b.bin\n")
    assert res.rc != 0 and "Failure" in res.err, res
    assert any(
        "quota exceeded: home holds" in r.getMessage() and "of 1048576 bytes" in r.getMessage() for r in caplog.records
    )
    # consistent: HomeSize counts what is really there (the partial b.bin included) and stays under the max
    used, files = homes.usage(home).bytes, homes.usage(home).files
    size = await env.size("alice")
    assert (size.used_bytes, size.files, size.max_bytes) == (used, files, 1 << 20)
    assert 700 * KiB <= used <= 1 << 20 and files == 2
    assert (home / "a.bin").read_bytes() == f700.read_bytes()
    # legacy scp shows the message itself
    scp = await env.scp(str(f700), "alice@127.0.0.1:c.bin", legacy=True)
    assert scp.rc != 0 and "quota exceeded: home holds" in scp.err, scp
    # rsync writes outside the SFTP hooks: a push into a full home is refused up front
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x").write_bytes(b"x")
    res = await env.sftp("alice", "rm b.bin\nrm c.bin\n")
    fill = tmp_path / "fill"
    fill.write_bytes(os.urandom((1 << 20) - 700 * KiB))
    res = await env.sftp("alice", f"put {fill} fill.bin\ndf\n")
    assert res.rc == 0, res
    assert res.out.strip().splitlines()[-1].split()[2] == "0"  # df: nothing left
    push = await env.rsync("-a", f"{tmp_path / 'src'}/", "alice@127.0.0.1:r/")
    assert push.rc != 0 and "quota exceeded" in push.err, push
    # after removing files there is room again
    res = await env.sftp("alice", f"rm fill.bin\nput {tmp_path / 'src' / 'x'} x\n")
    assert res.rc == 0, res
    size = await env.size("alice")
    assert size.used_bytes == 700 * KiB + 4 * KiB and size.files == 2  # a 1-byte file takes a block


async def test_raising_the_maximum_applies_to_open_sessions(ssh_factory: SshFactory, tmp_path: Path) -> None:
    env = await ssh_factory()
    await env.enable("alice", mb=1)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(1536 * KiB))
    res = await env.sftp("alice", f"put {big} big\n")
    assert res.rc != 0, res
    reply = await env.enable("alice", mb=2)
    assert (reply.created, reply.max_bytes) == (False, 2 << 20)
    res = await env.sftp("alice", f"put {big} big\n")
    assert res.rc == 0, res
    assert (await env.size("alice")).used_bytes == 1536 * KiB


async def test_removals_outside_sftp_are_recounted(
    ssh_factory: SshFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """maint (or Process) removes files server-side; a write refused on the old count recounts first."""
    env = await ssh_factory()
    await env.enable("alice", mb=1)
    f700 = tmp_path / "f700"
    f700.write_bytes(os.urandom(700 * KiB))
    assert (await env.sftp("alice", f"put {f700} a.bin\n")).rc == 0
    (env.home("alice") / "a.bin").unlink()  # as maint's cleanup would
    monkeypatch.setattr(ssh_home, "RECOUNT_AFTER", 0.0)
    res = await env.sftp("alice", f"put {f700} b.bin\n")
    assert res.rc == 0, res
    assert (await env.size("alice")).used_bytes == 700 * KiB
