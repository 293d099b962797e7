"""Fixtures for the ssh service: the real service on port 0 (gRPC and SSH), real clients, real redis.

After every test, each home it used is checked (``SshEnv.check_homes``): mode 0700 and the service's
owner, no set-id bits or foreign owners inside, nothing but homes in the homes folder.

``ssh_factory(ingest=False)`` starts only the ssh service (with redis); ``ingest=True`` starts meta
and ingest first (tests/ingest/conftest.py's suite) sharing the data dir, so Process jobs are stored.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import grpc
import pytest

from gridstor.v1 import ssh_pb2, ssh_pb2_grpc
from services.common import sshsig
from services.common.config import Config, build_config
from services.ssh import service as ssh_service
from tests.helpers import Result, run_program
from tests.ingest.conftest import Suite, suite_factory  # noqa: F401  (fixture re-exported)

CLIENTS = ("ssh", "sftp", "scp", "ssh-keygen", "rsync")


def need(*tools: str) -> None:
    """Skip unless the client programs are installed (make test installs them from Debian)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (Debian packages openssh-client rsync restic rclone)")


@dataclass(frozen=True)
class Keys:
    """Client key pairs made with ssh-keygen: name -> private key file (public: + .pub)."""

    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    def public(self, name: str) -> str:
        return (self.dir / f"{name}.pub").read_text().strip()

    def proof(self, name: str, method: str, username: str, epoch: int | None = None) -> ssh_pb2.AccountProof:
        """An account proof for ``method`` on ``username`` signed with key ``name`` (as `gridstor ssh -i` makes)."""
        epoch = int(time.time()) if epoch is None else epoch
        nonce = os.urandom(8).hex()
        key = asyncssh.read_private_key(self.path(name))
        message = sshsig.account_message(method, username, epoch, nonce)
        return ssh_pb2.AccountProof(
            epoch=epoch, nonce=nonce, signature=sshsig.sign(key, sshsig.ACCOUNT_NAMESPACE, message)
        )


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    need("ssh-keygen")
    d = tmp_path_factory.mktemp("sshkeys")
    for name in ("alice", "bob", "mallory"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@test", "-f", str(d / name)], check=True
        )
    return Keys(d)


@dataclass
class SshEnv:
    cfg: Config
    svc: ssh_service.SshService
    stub: ssh_pb2_grpc.SshServiceAsyncStub
    keys: Keys
    tmp: Path
    suite: Suite | None = None
    channel: Any = None
    extra: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    current: dict[str, str] = field(default_factory=dict)  # username -> the key it has now (set by enable)

    @property
    def port(self) -> int:
        return self.svc.ssh_port

    def home(self, user: str) -> Path:
        return self.svc.settings.homes_dir / user

    def proof(self, method: str, user: str) -> ssh_pb2.AccountProof | None:
        """A proof by the key ``user``'s account has now (None for an account these helpers did not make)."""
        key = self.current.get(user)
        return None if key is None else self.keys.proof(key, method, user)

    async def enable(self, user: str, key: str | None = None, mb: int = 64) -> ssh_pb2.EnableAccountReply:
        """EnableAccount as the account's user does it: with a proof by its current key once it exists."""
        req = ssh_pb2.EnableAccountRequest(username=user, public_key=self.keys.public(key or user), max_size_mb=mb)
        proof = self.proof("EnableAccount", user)
        if proof is not None:
            req.proof.CopyFrom(proof)
        reply: ssh_pb2.EnableAccountReply = await self.stub.EnableAccount(req)
        self.current[user] = key or user
        return reply

    async def size(self, user: str) -> ssh_pb2.HomeSizeReply:
        """HomeSize with a proof by the account's current key."""
        return await self.stub.HomeSize(ssh_pb2.HomeSizeRequest(username=user, proof=self.proof("HomeSize", user)))

    async def disable(self, user: str, *, remove_home: bool = False) -> ssh_pb2.DisableAccountReply:
        """DisableAccount with a proof by the account's current key."""
        proof = self.proof("DisableAccount", user)
        reply: ssh_pb2.DisableAccountReply = await self.stub.DisableAccount(
            ssh_pb2.DisableAccountRequest(username=user, remove_home=remove_home, proof=proof)
        )
        if remove_home:
            self.current.pop(user, None)
        return reply

    async def process(self, user: str, path: str, remove: bool | None = None) -> ssh_pb2.ProcessReply:
        """Process with a proof by the account's current key."""
        req = ssh_pb2.ProcessRequest(username=user, path=path, proof=self.proof("Process", user))
        if remove is not None:
            req.remove = remove
        reply: ssh_pb2.ProcessReply = await self.stub.Process(req)
        return reply

    def opts(self, key: str) -> list[str]:
        """OpenSSH options: no config, no host key pinning, batch mode, only this key."""
        return [
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(self.keys.path(key)),
        ]

    def ssh_command(self, key: str) -> str:
        """The ``ssh`` command line for rsync -e and restic's sftp.command."""
        return " ".join(["ssh", "-p", str(self.port), *self.opts(key)])

    async def ssh(
        self, user: str, *args: str, cmd: tuple[str, ...] = (), key: str | None = None, limit: float = 30
    ) -> Result:
        """``ssh [args] user@host [cmd]``."""
        dest = f"{user}@127.0.0.1"
        return await run_program("ssh", "-p", self.port, *self.opts(key or user), *args, dest, *cmd, limit=limit)

    async def sftp(self, user: str, batch: str, key: str | None = None) -> Result:
        """``sftp -b -`` with the commands in ``batch`` (a failing command stops it with rc 1)."""
        return await run_program(
            "sftp", "-P", self.port, *self.opts(key or user), "-b", "-", f"{user}@127.0.0.1", stdin=batch
        )

    async def scp(self, *args: str, key: str = "alice", legacy: bool = False) -> Result:
        mode = ["-O"] if legacy else []
        return await run_program("scp", *mode, "-P", self.port, *self.opts(key), *args)

    async def rsync(self, *args: str, key: str = "alice") -> Result:
        return await run_program("rsync", "-e", self.ssh_command(key), *args)

    def rclone_remote(self, user: str = "alice") -> list[str]:
        """rclone's flags for an on-the-fly ``:sftp:`` remote of ``user``'s home."""
        return [
            "--sftp-host=127.0.0.1",
            f"--sftp-port={self.port}",
            f"--sftp-user={user}",
            f"--sftp-key-file={self.keys.path(user)}",
            "--sftp-shell-type=none",
            "--config=" + str(self.tmp / "rclone.conf"),
        ]

    def restic(self, user: str = "alice", repo: str = "/repo") -> list[str]:
        """restic's argv prefix for a repository in ``user``'s home (0.14 has no sftp.args)."""
        command = f"sftp.command={self.ssh_command(user)} {user}@127.0.0.1 -s sftp"
        return ["restic", "-o", command, "-r", f"sftp:{user}@127.0.0.1:{repo}"]

    def client(self, user: str = "alice", **options: Any) -> Any:
        """An asyncssh client connection (``async with``) as ``user``."""
        return asyncssh.connect(
            "127.0.0.1",
            self.port,
            username=user,
            client_keys=[str(self.keys.path(user))],
            known_hosts=None,
            **options,
        )

    def check_homes(self) -> None:
        """What must hold after anything a client did: homes keep mode 0700 and the service's owner; no file
        in any home has set-id or sticky bits or a foreign owner; the homes folder holds only homes."""
        homes_dir = self.svc.settings.homes_dir
        for home in homes_dir.iterdir() if homes_dir.exists() else ():
            st = home.lstat()
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, (home, oct(st.st_mode))
            assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()), home
            for dirpath, dirnames, filenames in os.walk(home):
                for name in dirnames + filenames:
                    sub = os.lstat(os.path.join(dirpath, name))
                    assert not sub.st_mode & 0o7000, (dirpath, name, oct(sub.st_mode))
                    assert (sub.st_uid, sub.st_gid) == (os.geteuid(), os.getegid()), (dirpath, name)
            assert self.svc.gateway.accounts.get(home.name) is not None, f"{home} is not a home"


SshFactory = Callable[..., Awaitable[SshEnv]]


def processes_in(folder: Path) -> list[int]:
    """Pids whose working directory is ``folder`` (the server side of an rsync runs in the home)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == str(folder):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture
async def ssh_factory(
    tmp_path: Path,
    redis_server: Any,
    keys: Keys,
    suite_factory: Any,  # noqa: F811
) -> AsyncIterator[SshFactory]:
    """Start the ssh service (and with ingest=True meta + ingest first); everything stops afterwards."""
    need(*CLIENTS)
    envs: list[SshEnv] = []

    async def start(*, ingest: bool = False, data: Path | None = None, **overrides: Any) -> SshEnv:
        data_dir = data or tmp_path / f"data{len(envs)}"
        raw: dict[str, Any] = {
            "data_dir": str(data_dir),
            "redis": redis_server.url,
            "engine": {"chunk_size": "256KiB"},
            "workers": 1,
        }
        raw.update(overrides)
        suite = None
        if ingest:
            suite = await suite_factory(**raw)
            raw["ports"] = {"meta": suite.cfg.ports["meta"]}
        cfg = build_config(raw)
        svc = await ssh_service.start(cfg, port=0, ssh_port=0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{svc.running.port}")
        env = SshEnv(cfg, svc, ssh_pb2_grpc.SshServiceStub(channel), keys, tmp_path, suite, channel)
        envs.append(env)
        return env

    yield start
    for env in reversed(envs):
        with contextlib.suppress(Exception):
            await env.channel.close(None)
        with contextlib.suppress(Exception):
            await env.svc.cleanup()
    for env in envs:  # whatever a test's clients did: the homes are still homes (mode, owner, no set-id bits)
        env.check_homes()


async def restart(env: SshEnv) -> SshEnv:
    """Stop the ssh service and start it again on the same data dir (new ports)."""
    await env.channel.close(None)
    await env.svc.cleanup()
    env.svc = await ssh_service.start(env.cfg, port=0, ssh_port=0)
    env.channel = grpc.aio.insecure_channel(f"127.0.0.1:{env.svc.running.port}")
    env.stub = ssh_pb2_grpc.SshServiceStub(env.channel)
    return env


__all__ = ["Keys", "SshEnv", "SshFactory", "need", "processes_in", "restart"]
