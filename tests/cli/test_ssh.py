"""`gridstor ssh enable|size|process|disable` as a user runs them: the CLI as a subprocess, through a real Envoy
(TLS) to the real services in secret mode, OpenSSH's sftp into the home; another user's attempts fail with one
clear line each and change nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.net import REPO_ROOT as ROOT
from tests.gateway import Gateway, run_gateway
from tests.helpers import child_env

SECRET = "cli-ssh-test-secret-0123"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    for tool in ("ssh-keygen", "sftp"):
        if shutil.which(tool) is None:
            pytest.skip(f"not installed: {tool} (Debian package openssh-client)")
    with run_gateway(tmp_path_factory.mktemp("cli-ssh"), {"mode": "secret", "secret": SECRET}, ssh=True) as g:
        yield g


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir()
    for name, passphrase in (("alice", ""), ("mallory", ""), ("alice2", ""), ("locked", "open sesame")):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(d / name)], check=True)
    return d


class User:
    """One shell user of the CLI: own HOME (so own saved token), one gateway."""

    def __init__(self, gw: Gateway, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.gw = gw
        self.env = child_env(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))

    def __call__(self, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        gateway = f"https://127.0.0.1:{self.gw.envoy_port}"
        argv = [sys.executable, "-m", "services.cli", "--gateway", gateway, "--ca", str(self.gw.ca), *map(str, args)]
        r = subprocess.run(
            argv, cwd=ROOT, env=self.env | (env or {}), capture_output=True, text=True, timeout=120, check=False
        )
        assert "Traceback" not in r.stderr, r.stderr
        return r

    def ok(self, *args: object, **kw: dict[str, str]) -> str:
        r = self(*args, **kw)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def fails(self, *args: object, code: int = 1, **kw: dict[str, str]) -> str:
        """The one line a failing command prints (without the 'gridstor: ' prefix)."""
        r = self(*args, **kw)
        assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
        assert r.stderr.startswith("gridstor: ") and r.stderr.count("\n") == 1, r.stderr
        return r.stderr.removeprefix("gridstor: ").strip()


def sftp(gw: Gateway, user: str, key: Path, batch: str) -> subprocess.CompletedProcess[str]:
    opts = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    opts += ["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i", str(key)]
    argv = ["sftp", "-P", str(gw.ssh_port), *opts, "-b", "-", f"{user}@127.0.0.1"]
    return subprocess.run(argv, input=batch, capture_output=True, text=True, timeout=60, check=False)


def login(user: User) -> None:
    assert "logged in as" in user.ok("login", "--secret-env", "GS_SECRET", env={"GS_SECRET": SECRET})


def test_a_user_manages_their_account_and_nobody_else_does(gw: Gateway, keys: Path, tmp_path: Path) -> None:
    alice, mallory = User(gw, tmp_path / "alice"), User(gw, tmp_path / "mallory")
    login(alice)
    login(mallory)
    made = alice.ok("ssh", "enable", "alice", "-i", keys / "alice", "--size", "5")
    assert made == (
        f"account alice created: home up to 5.0 MiB; the gateway's SSH host key is {gw.ssh_host_key}"
        " (compare it when you first connect)"
    )
    notes = tmp_path / "notes.txt"
    notes.write_text("alice's notes\n")
    assert sftp(gw, "alice", keys / "alice", f"put {notes} notes.txt\n").returncode == 0
    size = json.loads(alice.ok("ssh", "size", "alice", "-i", keys / "alice", "--json"))
    assert size == {
        "username": "alice",
        "used_bytes": 4096,  # what the disk holds: a 14-byte file takes a block
        "max_bytes": 5 * 1024 * 1024,
        "files": 1,
        "enabled": True,
        "owner": "",
        "entries": 1,
        "max_entries": 1_000_000,
    }

    # mallory: her own key proves nothing about alice's account; no key at all neither
    assert mallory.fails("ssh", "enable", "alice", "-i", keys / "mallory") == (
        "permission denied: the account proof is signed with another key than SSH account 'alice' has: sign with the"
        " private key of its current public key"
    )
    for args, verb, command in [
        (["size", "alice"], "read the size of", "size"),
        (["process", "alice", "notes.txt"], "process the home of", "process"),
        (["disable", "alice", "--remove-home"], "disable or remove", "disable"),
    ]:
        assert mallory.fails("ssh", *args) == (
            f"permission denied: SSH account 'alice' exists and is not yours to {verb}: prove you hold its SSH key"
            f" (gridstor ssh {command} alice -i KEY, or an AccountProof signed with `ssh-keygen -Y sign -n"
            " gridstor-ssh-account`; see docs/security.md), or use an admin token"
        )
    denied = sftp(gw, "alice", keys / "mallory", "ls\n")
    assert denied.returncode == 255 and "Permission denied (publickey)" in denied.stderr

    # alice stores her file from the home (--keep: it stays) and gets it back by id
    file_id = alice.ok("ssh", "process", "alice", "notes.txt", "--keep", "--wait", "-i", keys / "alice")
    assert file_id.endswith(".txt") and len(file_id) == 60
    copy = tmp_path / "copy.txt"
    alice.ok("get", file_id, "-o", copy)
    assert copy.read_text() == "alice's notes\n"

    # resized below what her home holds: she is told what the next cleanup sweep removes
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * 1024 * 1024))
    assert sftp(gw, "alice", keys / "alice", f"put {big} big.bin\n").returncode == 0
    shrunk = alice.ok("ssh", "enable", "alice", "-i", keys / "alice", "--size", "1")
    assert shrunk.splitlines()[1].startswith("home holds 2101248 bytes, over its limit of 1048576: "), shrunk
    assert "removes 2 files (2101248 bytes), oldest first" in shrunk  # notes.txt first, then big.bin
    alice.ok("ssh", "enable", "alice", "-i", keys / "alice", "--size", "5")
    assert sftp(gw, "alice", keys / "alice", "rm big.bin\n").returncode == 0

    # she rotates her key: the old one opens nothing and proves nothing afterwards
    rotated = alice.ok("ssh", "enable", "alice", "--pubkey", keys / "alice2.pub", "-i", keys / "alice")
    assert rotated.startswith("account alice updated: home up to 5.0 MiB")
    assert sftp(gw, "alice", keys / "alice", "ls\n").returncode == 255
    assert sftp(gw, "alice", keys / "alice2", "ls\n").returncode == 0
    assert "signed with another key" in alice.fails("ssh", "size", "alice", "-i", keys / "alice")

    # disabled: no logins, no processing; removed: gone with the home
    assert alice.ok("ssh", "disable", "alice", "-i", keys / "alice2") == (
        "account alice disabled (its home is kept; `enable` opens it again)"
    )
    assert alice.fails("ssh", "process", "alice", "notes.txt", "-i", keys / "alice2") == (
        "refused: SSH account 'alice' is disabled: enable it again before processing its home"
    )
    assert sftp(gw, "alice", keys / "alice2", "ls\n").returncode == 255
    assert alice.ok("ssh", "disable", "alice", "--remove-home", "-i", keys / "alice2") == (
        "account alice removed with its home"
    )
    assert alice.fails("ssh", "size", "alice") == "not found: no SSH account 'alice'"
    assert alice.fails("ssh", "disable", "alice") == "not found: no SSH account 'alice'; nothing changed"


def test_key_and_usage_errors(gw: Gateway, keys: Path, tmp_path: Path) -> None:
    user = User(gw, tmp_path / "u")
    login(user)
    assert user.fails("ssh", "enable", "bob", code=2) == (
        "give the key to allow: --pubkey FILE (its .pub line), or -i KEY (its public half is taken)"
    )
    assert user.fails("ssh", "size", "bob", "-i", keys / "alice.pub", code=2) == (
        f"-i {keys / 'alice.pub'}: that is a public key; give the private key file (without .pub)"
    )
    assert user.fails("ssh", "size", "bob", "-i", tmp_path / "none", code=2) == (
        f"cannot read the SSH private key {tmp_path / 'none'}: No such file or directory"
    )
    locked = keys / "locked"
    assert user.fails("ssh", "enable", "bob", "-i", locked, code=2) == (
        f"the SSH key {locked} is protected by a passphrase: run in a terminal, or set $GRIDSTOR_SSH_PASSPHRASE"
    )
    made = json.loads(
        user.ok("ssh", "enable", "bob", "-i", locked, "--json", env={"GRIDSTOR_SSH_PASSPHRASE": "open sesame"})
    )
    assert (made["username"], made["created"]) == ("bob", True)
    assert "cannot unlock" in user.fails(
        "ssh", "size", "bob", "-i", locked, code=2, env={"GRIDSTOR_SSH_PASSPHRASE": "no"}
    )
    sized = user.ok("ssh", "size", "bob", "-i", locked, env={"GRIDSTOR_SSH_PASSPHRASE": "open sesame"})
    assert sized.startswith("bob: 0 B of 1.0 GiB used (0 bytes in 0 files); enabled")
