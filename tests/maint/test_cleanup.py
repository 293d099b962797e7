"""Home cleanup: oldest first, stops under the limit, any depth, never follows a symlink out of the home.

A home holds allocated blocks: the files here are whole blocks (B), each folder takes one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from services.common.config import build_config
from services.common.errors import InvalidInput
from services.maint.cleanup import enforce_quota, home_usage, sweep_homes
from tests.helpers import deep_folder, remove_tree

NOW = 1_700_000_000
B = 4096  # one block of the test file system (ext4, tmpfs)


def put(home: Path, rel: str, size: int, age: int) -> Path:
    """A file of ``size`` bytes whose mtime is ``age`` seconds before NOW."""
    path = home / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - age, NOW - age))
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "homes" / "alice"
    h.mkdir(parents=True)
    return h


def test_under_the_limit_nothing_goes(home: Path) -> None:
    put(home, "a", 100, 30)
    put(home, "b", 100, 20)
    assert home_usage(home) == 2 * B  # 100 bytes take a block each
    assert enforce_quota(home, 2 * B) == []
    assert sorted(p.name for p in home.iterdir()) == ["a", "b"]


def test_oldest_first_and_stops_as_soon_as_under(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    put(home, "newest", B, 10)
    put(home, "sub/oldest", B, 50)
    put(home, "middle", B, 30)
    put(home, "sub/deep/older", B, 40)
    assert home_usage(home) == 6 * B  # 4 files, 2 folders
    caplog.set_level(logging.INFO, logger="services.common.homes")
    removed = enforce_quota(home, 4 * B + B // 2)
    assert [r.path for r in removed] == ["sub/oldest", "sub/deep/older"]
    assert [(r.size, r.allocated) for r in removed] == [(B, B), (B, B)]
    assert removed[0].mtime == NOW - 50
    assert (home / "newest").exists() and (home / "middle").exists()
    assert not (home / "sub" / "oldest").exists()
    assert (home / "sub" / "deep").is_dir()  # folders stay
    assert home_usage(home) == 4 * B
    assert [r.getMessage() for r in caplog.records if "removed" in r.getMessage()] == [
        "home over its limit: removed sub/oldest",
        "home over its limit: removed sub/deep/older",
    ]


def test_a_big_new_file_takes_old_ones_with_it(home: Path) -> None:
    put(home, "old1", B, 100)
    put(home, "old2", B, 90)
    put(home, "huge", 10 * B, 1)
    removed = enforce_quota(home, 5 * B)
    # Oldest first until under: the small old files go first, then the big one itself.
    assert [r.path for r in removed] == ["old1", "old2", "huge"]
    assert list(home.iterdir()) == []


def test_zero_limit_empties_and_negative_is_refused(home: Path) -> None:
    put(home, "a", 1, 1)
    with pytest.raises(InvalidInput):
        enforce_quota(home, -1)
    assert [r.path for r in enforce_quota(home, 0)] == ["a"]


def test_symlinks_are_not_followed_counted_or_removed(home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = put(outside, "precious", 10_000, 1000)  # very old, outside the home
    (home / "link-to-file").symlink_to(victim)
    (home / "link-to-dir").symlink_to(outside, target_is_directory=True)
    put(home, "mine-old", 3 * B, 500)
    put(home, "mine-new", 3 * B, 5)
    # the 10 kB behind the links do not count; the links themselves (long targets) take a block each
    assert home_usage(home) == 6 * B + 2 * B
    removed = enforce_quota(home, 5 * B)
    assert [r.path for r in removed] == ["mine-old"]
    assert victim.exists() and victim.stat().st_size == 10_000
    assert (home / "link-to-file").is_symlink() and (home / "link-to-dir").is_symlink()


def test_a_symlinked_home_is_left_alone(tmp_path: Path) -> None:
    real = tmp_path / "real"
    put(real, "f", 100, 100)
    link = tmp_path / "home-link"
    link.symlink_to(real, target_is_directory=True)
    assert enforce_quota(link, 0) == []
    assert (real / "f").exists()


def test_hard_links_count_once_and_go_together(home: Path) -> None:
    a = put(home, "a", 4 * B, 100)
    os.link(a, home / "a-again")
    put(home, "b", B, 10)
    assert home_usage(home) == 5 * B
    removed = enforce_quota(home, 4 * B + B // 2)
    assert [(r.path, r.size) for r in removed] == [("a", 4 * B)]
    assert sorted(p.name for p in home.iterdir()) == ["b"]


def test_special_files_and_missing_home(home: Path, tmp_path: Path) -> None:
    os.mkfifo(home / "fifo")
    put(home, "f", 10, 10)
    assert [r.path for r in enforce_quota(home, 0)] == ["f"]
    assert (home / "fifo").exists()
    assert enforce_quota(tmp_path / "nobody", 0) == []


def test_sweep_uses_the_ssh_accounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test"
    data = tmp_path / "gw"
    state = data / "ssh"
    state.mkdir(parents=True)
    doc = {
        "version": 1,
        "accounts": {
            "alice": {"public_key": key, "max_bytes": B + B // 2},
            "bob": {"public_key": key, "max_bytes": 10_000},
        },
    }
    (state / "accounts.json").write_text(json.dumps(doc))
    put(data / "homes" / "alice", "old", 100, 100)
    put(data / "homes" / "alice", "new", 100, 1)
    put(data / "homes" / "bob", "old", 100, 100)
    cfg = build_config({"data_dir": str(data)})
    removed = sweep_homes(cfg)
    assert {u: [r.path for r in rs] for u, rs in removed.items()} == {"alice": ["old"]}
    assert (data / "homes" / "bob" / "old").exists()


def test_files_at_any_depth_are_counted_and_go_in_age_order(home: Path) -> None:
    """3,000 folders deep (no recursion, one folder descriptor at a time): the old deep file goes first."""
    try:
        fd = deep_folder(home, 3000)
        deep = os.open("deep.bin", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(deep, b"d" * B)
        os.close(deep)
        os.utime("deep.bin", (NOW - 1000, NOW - 1000), dir_fd=fd)
        os.close(fd)
        put(home, "visible-new", B, 10)
        put(home, "visible-newer", B, 5)
        assert home_usage(home) == 3000 * B + 3 * B
        removed = enforce_quota(home, 3000 * B + 2 * B)
        assert [(r.path.count("/"), r.path.rsplit("/", 1)[-1]) for r in removed] == [(3000, "deep.bin")]
        assert (home / "visible-new").exists() and (home / "visible-newer").exists()
        assert home_usage(home) == 3000 * B + 2 * B
    finally:
        remove_tree(home)
