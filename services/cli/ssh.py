"""SSH account commands: ``gridstor ssh enable|size|process|disable USER``.

They call the gateway's SshService with the saved token (``gridstor login``; none needed in
public mode). An existing account is yours to change when you hold its current SSH key:
``-i KEY`` (an OpenSSH private key file) signs an account proof for each call
(services/common/sshsig.py). In allowlist mode the identity that created an account owns it
and needs no ``-i``; an admin token (``gridstor admin token``) may manage every account.
A passphrase-protected key asks for its passphrase on the terminal, or reads
``$GRIDSTOR_SSH_PASSPHRASE``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncssh

from gridstor.v1 import ssh_pb2, ssh_pb2_grpc
from services.cli.commands import wait_stored
from services.cli.failures import EXIT_OK, EXIT_USAGE, CliFailure
from services.cli.progress import human
from services.cli.session import UNARY_TIMEOUT, Session
from services.common import sshsig
from services.common.service_main import positive_seconds

Handler = Callable[[Session, argparse.Namespace], int]
PASSPHRASE_ENV = "GRIDSTOR_SSH_PASSPHRASE"


def _stub(s: Session) -> ssh_pb2_grpc.SshServiceStub:
    return ssh_pb2_grpc.SshServiceStub(s.channel("ssh"))


def load_private_key(path: str) -> asyncssh.SSHKey:
    """An OpenSSH private key file, asking for its passphrase when it has one; CliFailure saying what is wrong."""
    file = Path(path).expanduser()
    if file.suffix == ".pub":
        raise CliFailure(f"-i {path}: that is a public key; give the private key file (without .pub)", EXIT_USAGE)
    try:
        return asyncssh.read_private_key(file)
    except (asyncssh.KeyEncryptionError, asyncssh.KeyImportError) as exc:
        if "passphrase" not in str(exc).lower():  # asyncssh asks for one with either error
            raise CliFailure(f"cannot read the SSH private key {path}: {exc}", EXIT_USAGE) from None
    except OSError as exc:
        raise CliFailure(f"cannot read the SSH private key {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    passphrase = os.environ.get(PASSPHRASE_ENV)
    if passphrase is None:
        if not sys.stdin.isatty():
            raise CliFailure(
                f"the SSH key {path} is protected by a passphrase: run in a terminal, or set ${PASSPHRASE_ENV}",
                EXIT_USAGE,
            )
        passphrase = getpass.getpass(f"passphrase for {path}: ")
    try:
        return asyncssh.read_private_key(file, passphrase)
    except (asyncssh.KeyEncryptionError, asyncssh.KeyImportError) as exc:
        raise CliFailure(f"cannot unlock the SSH private key {path}: {exc}", EXIT_USAGE) from None


def account_proof(key: asyncssh.SSHKey, method: str, username: str) -> ssh_pb2.AccountProof:
    """A fresh proof that we hold ``key``, for one call of ``method`` on ``username``."""
    epoch = int(time.time())
    nonce = secrets.token_urlsafe(12)  # letters, digits, '-' and '_': the nonce grammar
    message = sshsig.account_message(method, username, epoch, nonce)
    return ssh_pb2.AccountProof(epoch=epoch, nonce=nonce, signature=sshsig.sign(key, sshsig.ACCOUNT_NAMESPACE, message))


def _with_proof(request: Any, a: argparse.Namespace, key: asyncssh.SSHKey | None, method: str) -> Any:
    if key is not None:
        request.proof.CopyFrom(account_proof(key, method, a.user))
    return request


def _key(a: argparse.Namespace) -> asyncssh.SSHKey | None:
    return load_private_key(a.identity_file) if a.identity_file else None


def _public_key(a: argparse.Namespace, key: asyncssh.SSHKey | None) -> str:
    """The public key line to allow: --pubkey FILE, else the public half of -i KEY."""
    if a.pubkey:
        try:
            text = sys.stdin.read() if a.pubkey == "-" else Path(a.pubkey).expanduser().read_text()
        except OSError as exc:
            raise CliFailure(f"cannot read the public key {a.pubkey}: {exc.strerror}", EXIT_USAGE) from None
        return text.strip()
    if key is not None:
        return bytes(key.export_public_key("openssh")).decode().strip()
    raise CliFailure(
        "give the key to allow: --pubkey FILE (its .pub line), or -i KEY (its public half is taken)", EXIT_USAGE
    )


def cmd_enable(s: Session, a: argparse.Namespace) -> int:
    """Create an account (or change yours: its key with --pubkey, its size with --size)."""
    key = _key(a)
    request = ssh_pb2.EnableAccountRequest(username=a.user, public_key=_public_key(a, key), max_size_mb=a.size or 0)
    with s.rpc("ssh"):
        r = _stub(s).EnableAccount(
            _with_proof(request, a, key, "EnableAccount"), metadata=s.auth_metadata(), timeout=UNARY_TIMEOUT
        )
    owner = f"; owned by {r.owner}" if r.owner else ""
    over = r.over_limit if r.HasField("over_limit") else None
    s.result(
        f"account {r.username} {'created' if r.created else 'updated'}: home up to {human(r.max_bytes)}{owner};"
        f" the gateway's SSH host key is {r.host_key_fingerprint} (compare it when you first connect)"
        + (f"\n{over.notice}" if over is not None else ""),
        {
            "username": r.username,
            "created": r.created,
            "max_bytes": r.max_bytes,
            "host_key_fingerprint": r.host_key_fingerprint,
            "owner": r.owner,
            "used_bytes": r.used_bytes,
            "over_limit": None
            if over is None
            else {"files": over.files, "bytes": over.bytes, "paths": list(over.paths), "notice": over.notice},
        },
    )
    return EXIT_OK


def cmd_size(s: Session, a: argparse.Namespace) -> int:
    """What the home holds (bytes on disk, files, entries) and its limits."""
    request = _with_proof(ssh_pb2.HomeSizeRequest(username=a.user), a, _key(a), "HomeSize")
    with s.rpc("ssh"):
        r = _stub(s).HomeSize(request, metadata=s.auth_metadata(), timeout=UNARY_TIMEOUT)
    state = "enabled" if r.enabled else "DISABLED"
    owner = f", owned by {r.owner}" if r.owner else ""
    s.result(
        f"{r.username}: {human(r.used_bytes)} of {human(r.max_bytes)} used ({r.used_bytes} bytes in {r.files}"
        f" files); {state}{owner}",
        {
            "username": r.username,
            "used_bytes": r.used_bytes,
            "max_bytes": r.max_bytes,
            "files": r.files,
            "enabled": r.enabled,
            "owner": r.owner,
            "entries": r.entries,
            "max_entries": r.max_entries,
        },
    )
    return EXIT_OK


def cmd_process(s: Session, a: argparse.Namespace) -> int:
    """Store a file (or a folder as .tar.gz) of the home; print the job id, or the file id with --wait."""
    request = ssh_pb2.ProcessRequest(username=a.user, path=a.path, remove=not a.keep)
    request = _with_proof(request, a, _key(a), "Process")
    with s.rpc("ssh"):
        r = _stub(s).Process(request, metadata=s.auth_metadata(), timeout=UNARY_TIMEOUT)
    data: dict[str, Any] = {"job": r.job, "path": r.path, "directory": r.directory, "name": r.name}
    if not a.wait:
        s.result(r.job, data)
        return EXIT_OK
    status = wait_stored(s, r.job, a.timeout)
    s.result(status.file_id, {**data, "file_id": status.file_id, "size": status.size, "hash": status.hash})
    return EXIT_OK


def cmd_disable(s: Session, a: argparse.Namespace) -> int:
    """Refuse further logins (the home is kept), or with --remove-home delete the account and its home."""
    request = ssh_pb2.DisableAccountRequest(username=a.user, remove_home=a.remove_home)
    request = _with_proof(request, a, _key(a), "DisableAccount")
    with s.rpc("ssh"):
        r = _stub(s).DisableAccount(request, metadata=s.auth_metadata(), timeout=UNARY_TIMEOUT)
    data = {"username": r.username, "existed": r.existed, "home_removed": r.home_removed}
    if not r.existed:
        if s.json:
            s.result("", data)
        raise CliFailure(f"not found: no SSH account {a.user!r}; nothing changed")
    what = "removed with its home" if r.home_removed else "disabled (its home is kept; `enable` opens it again)"
    s.result(f"account {r.username} {what}", data)
    return EXIT_OK


def add_commands(sub: Any, common: Sequence[argparse.ArgumentParser]) -> None:
    """Add ``ssh enable|size|process|disable`` to the ``gridstor`` subcommands."""
    ssh = sub.add_parser(
        "ssh",
        help="SSH accounts: enable, size, process, disable (SFTP/SCP/rsync homes)",
        description="Manage an SSH account of the gateway. An existing account is changed by whoever holds its"
        " SSH key (-i KEY signs a proof), by its owner in allowlist mode, or with an admin token.",
        parents=common,
    )
    ssub = ssh.add_subparsers(dest="ssh_command", metavar="SSH_COMMAND", required=True)

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = ssub.add_parser(name, help=help_text, description=help_text, parents=common)
        p.set_defaults(handler=handler)
        p.add_argument("user", metavar="USER", help="the account's login name")
        p.add_argument(
            "-i",
            dest="identity_file",
            metavar="KEY",
            help="your SSH private key that the account has now: proves the account is yours",
        )
        return p

    p = command("enable", cmd_enable, "create an account, or change your account's key (--pubkey) or size")
    p.add_argument("--pubkey", metavar="FILE", help="the public key to allow (a .pub file; - = stdin); default: -i's")
    p.add_argument("--size", type=_mib, metavar="MB", help="the home's maximum size in MiB (default: the gateway's)")
    command("size", cmd_size, "show the bytes used in the home and its maximum")
    p = command("process", cmd_process, "store a file or folder of the home (then removed, unless --keep)")
    p.add_argument("path", metavar="PATH", help="file or folder, relative to the home ('/' = all of it)")
    p.add_argument("--keep", action="store_true", help="keep the path in the home after it is stored")
    p.add_argument("--wait", action="store_true", help="wait until stored; print the file id")
    p.add_argument("--timeout", type=positive_seconds, metavar="S", help="with --wait: give up after S seconds")
    p = command("disable", cmd_disable, "refuse further logins (the home is kept unless --remove-home)")
    p.add_argument("--remove-home", action="store_true", help="also delete the account and everything in its home")


def _mib(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of MiB, got {text!r}") from None
    if not 1 <= n <= 1 << 30:
        raise argparse.ArgumentTypeError(f"must be between 1 and {1 << 30} MiB, got {n}")
    return n
