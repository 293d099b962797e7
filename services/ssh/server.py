"""The SSH server (asyncssh): key-only logins into SFTP/SCP/rsync-only homes.

* Authentication: public key only, against the account's one key. Every user,
  known or not, is offered publickey, so a refusal does not tell which
  usernames exist. Disabled accounts cannot log in; disabling (or replacing the
  key) closes the user's open connections.
* Sessions: the ``sftp`` subsystem and ``scp`` (both served by
  ``HomeSFTPServer``), and ``rsync --server ...`` run through rsync's own
  restricted wrapper (``rrsync -munge -no-lock HOME``), so rsync stays in the
  home and symlinks it stores are munged. Shells, other commands, other
  subsystems, PTYs, port/agent/X11 forwarding are refused (and logged).
* The host key is generated once into ``DATA/ssh/host_key`` (ed25519, 0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import stat
from pathlib import Path
from typing import Any

import asyncssh

from services.common import errors
from services.common.accounts import Account, check_username, home_path
from services.ssh.accounts import MAX_SIZE_MB, MIB, AccountStore, Home, ensure_home
from services.ssh.audit import SshMetrics, refused
from services.ssh.sftp import HomeSFTPServer, install_write_padding_fix

log = logging.getLogger(__name__)

HOST_KEY_FILE = "host_key"
PUMP_BLOCK = 256 * 1024
NOT_A_SHELL = b"This account allows SFTP, SCP and rsync only: no shell, no commands.\n"


def load_host_key(state_dir: Path) -> asyncssh.SSHKey:
    """The server's ed25519 host key, generated on first use (0600) and kept."""
    path = state_dir / HOST_KEY_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # another process that created it first wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        log.info("generated the SSH host key", extra={"file": str(path)})
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise errors.InvalidInput(f"SSH host key {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    try:
        return asyncssh.read_private_key(path)
    except (asyncssh.KeyImportError, OSError) as exc:
        raise errors.InvalidInput(
            f"SSH host key {path} cannot be read ({exc}); move it away to make a new one"
        ) from None


class SshGateway:
    """State shared by every SSH connection: accounts, homes, live connections."""

    def __init__(
        self,
        accounts: AccountStore,
        homes_dir: Path,
        metrics: SshMetrics,
        rrsync: Path | None,
    ) -> None:
        self.accounts = accounts
        self.homes_dir = homes_dir
        self.metrics = metrics
        self.rrsync = rrsync
        self.homes: dict[str, Home] = {}
        self.connections: dict[str, set[asyncssh.SSHServerConnection]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.acceptor: asyncssh.SSHAcceptor | None = None
        install_write_padding_fix()

    def home(self, username: str) -> Home:
        """The home of an existing account (one shared object per user)."""
        acct = self.accounts.get(username)
        if acct is None:
            raise errors.NotFound(f"no SSH account {username!r}")
        home = self.homes.get(username)
        if home is None:
            home = self.homes[username] = Home(username, home_path(self.homes_dir, username), acct.max_bytes)
        home.max_bytes = acct.max_bytes
        return home

    def close_connections(self, username: str, reason: str) -> int:
        """Disconnect every open connection of ``username``; how many there were."""
        conns = list(self.connections.get(username, ()))
        for conn in conns:
            log.info("closing SSH connection: %s", reason, extra={"user": username})
            conn.close()
        return len(conns)

    def background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self, host: str, port: int, host_key: asyncssh.SSHKey) -> int:
        """Listen; return the bound port."""
        self.acceptor = await asyncssh.create_server(
            lambda: _Connection(self),
            host,
            port,
            server_host_keys=[host_key],
            process_factory=self._process,
            sftp_factory=self._sftp,
            allow_scp=True,
            encoding=None,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
            password_auth=False,
            kbdint_auth=False,
            host_based_auth=False,
            gss_host=None,
            line_editor=False,
            keepalive_interval=60,
        )
        sockets = self.acceptor.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close()
            await self.acceptor.wait_closed()
            self.acceptor = None
        for conns in list(self.connections.values()):
            for conn in list(conns):
                conn.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    # -------------------------------------------------------------- accounts

    async def enable(
        self,
        username: str,
        public_key: str,
        max_size_mb: int,
        default_max: int,
        *,
        expect: Account | None,
        owner: str | None = None,
    ) -> tuple[Account, bool]:
        """Create or update an account and its home; 0 MiB = the default for a new account, unchanged otherwise.

        ``expect``: the account as the caller was allowed on (None: a new one); ``owner`` None keeps the owner.
        """
        check_username(username)
        if max_size_mb > MAX_SIZE_MB:
            raise errors.InvalidInput(f"max_size_mb {max_size_mb} is over the largest home ({MAX_SIZE_MB} MiB)")
        old = expect
        max_bytes = max_size_mb * MIB if max_size_mb else (None if old is not None else default_max)
        acct, created = await self.accounts.enable(username, public_key, max_bytes, expect=expect, owner=owner)
        await asyncio.to_thread(ensure_home, self.homes_dir, username)
        self.home(username)  # the shared Home takes the new size now
        if old is not None and old.key_blob != acct.key_blob:
            self.close_connections(username, "the account's key was replaced")
        log.info(
            "ssh account %s",
            "created" if created else "updated",
            extra={
                "user": username,
                "max_bytes": acct.max_bytes,
                "key_type": acct.public_key.split(" ", 1)[0],
                "owner": acct.owner,
            },
        )
        return acct, created

    async def disable(self, username: str, *, remove_home: bool, expect: Account | None) -> tuple[bool, bool]:
        """Refuse logins (and close open connections); with remove_home drop the home and the account."""
        check_username(username)
        old = await self.accounts.disable(username, forget=remove_home, expect=expect)
        if old is None:
            return False, False
        self.close_connections(username, "the account was disabled")
        removed = False
        if remove_home:
            self.homes.pop(username, None)
            path = home_path(self.homes_dir, username)
            if path.is_dir() and not path.is_symlink():
                await asyncio.to_thread(shutil.rmtree, path)
                removed = True
        log.info("ssh account disabled", extra={"user": username, "home_removed": removed})
        return True, removed

    async def home_size(self, username: str) -> tuple[Account, Home]:
        """The account and its home, freshly counted."""
        check_username(username)
        acct = self.accounts.get(username)
        if acct is None:
            raise errors.NotFound(f"no SSH account {username!r}")
        home = self.home(username)
        await home.refresh(force=True)
        return acct, home

    # -------------------------------------------------------------- sessions

    async def _sftp(self, chan: asyncssh.SSHServerChannel[bytes]) -> asyncssh.SFTPServer:
        home = self.home(chan.get_extra_info("username"))
        await home.refresh()
        return HomeSFTPServer(chan, home, self.metrics)

    async def _process(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        """Anything but sftp and scp: rsync through rrsync, or a refusal."""
        user = process.get_extra_info("username")
        peer = _peer(process.get_extra_info("peername"))
        try:
            if process.subsystem is not None:
                refused(self.metrics, "subsystem", f"subsystem {process.subsystem!r}", user=user, peer=peer)
                _refuse(process, f"subsystem {process.subsystem!r} is not available here; use sftp.\n".encode())
                return
            command = process.command
            if command is None:
                refused(self.metrics, "shell", "interactive shell", user=user, peer=peer)
                _refuse(process, NOT_A_SHELL)
                return
            try:
                argv = shlex.split(command)
            except ValueError:
                argv = []
            if argv[:2] == ["rsync", "--server"]:
                await self._rsync(process, self.home(user), command, argv, peer)
                return
            refused(self.metrics, "exec", f"command {command[:200]!r}", user=user, peer=peer)
            _refuse(process, NOT_A_SHELL)
        except errors.NotFound:  # the account went away meanwhile
            _refuse(process, b"this account is no longer enabled\n")

    async def _rsync(
        self, process: asyncssh.SSHServerProcess[bytes], home: Home, command: str, argv: list[str], peer: str
    ) -> None:
        """Run rsync's server side through rrsync, confined to the home, links munged."""
        if self.rrsync is None:
            _refuse(process, b"rsync is not available on this server (rrsync is missing)\n")
            return
        pull = len(argv) > 2 and argv[2] == "--sender"
        if not pull:
            await home.refresh()
            if home.used >= home.max_bytes:
                self.metrics.quota.inc()
                _refuse(process, f"rsync: {home.message()}\n".encode())
                return
        self.metrics.rsync.inc(direction="pull" if pull else "push")
        client = process.get_extra_info("peername") or ("", 0)
        local = process.get_extra_info("sockname") or ("", 0)
        env = {
            "SSH_ORIGINAL_COMMAND": command,
            "SSH_CONNECTION": f"{client[0]} {client[1]} {local[0]} {local[1]}",
            "PATH": "/usr/bin:/bin",
            "HOME": str(home.root),
            "LANG": "C.UTF-8",
        }
        proc = await asyncio.create_subprocess_exec(
            str(self.rrsync),
            "-munge",
            "-no-lock",
            str(home.root),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=home.root,
            env=env,
            start_new_session=True,
        )
        log.info("rsync started", extra={"user": home.username, "peer": peer, "pull": pull, "pid": proc.pid})
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        # Own pumps rather than process.redirect: the exit status goes out only after rsync's last byte.
        feed = asyncio.ensure_future(_pump_in(process.stdin, proc.stdin))
        outputs = asyncio.gather(_pump_out(proc.stdout, process.stdout), _pump_out(proc.stderr, process.stderr))
        finished = asyncio.gather(proc.wait(), outputs)
        closed: asyncio.Future[None] = asyncio.ensure_future(process.channel.wait_closed())
        try:
            either: list[asyncio.Future[Any]] = [finished, closed]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if finished.done() and not finished.exception():
                process.exit(finished.result()[0])
            else:
                log.info("rsync client went away; stopping rsync", extra={"user": home.username, "peer": peer})
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if not finished.done():
                try:
                    await asyncio.wait_for(asyncio.shield(finished), 2)
                except Exception as exc:  # rsync is killed; its output has nowhere to go
                    log.debug("rsync's last output dropped: %r", exc, extra={"user": home.username, "peer": peer})
                finished.cancel()
            feed.cancel()
            closed.cancel()
            proc.stdin.close()
            await asyncio.gather(finished, feed, closed, return_exceptions=True)
            if not pull:
                home.invalidate()
                self.background(_after_push(home))


async def _pump_in(src: asyncssh.SSHReader[bytes], dst: asyncio.StreamWriter) -> None:
    """Client to rsync, until the client's EOF."""
    try:
        while data := await src.read(PUMP_BLOCK):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, asyncssh.Error):
        pass
    finally:
        dst.close()


async def _pump_out(src: asyncio.StreamReader, dst: asyncssh.SSHWriter[bytes]) -> None:
    """rsync's stdout or stderr to the client, until rsync closes it."""
    while data := await src.read(PUMP_BLOCK):
        dst.write(data)
        await dst.drain()


async def _after_push(home: Home) -> None:
    """rsync writes outside the SFTP hooks: recount, and say so when the home is over its size."""
    await home.refresh(force=True)
    if home.used > home.max_bytes:
        log.warning(
            "home is over its maximum size after an rsync push; maint removes the oldest files",
            extra={"user": home.username, "used": home.used, "max_bytes": home.max_bytes},
        )


def _peer(addr: Any) -> str:
    if not addr:
        return ""
    return f"{addr[0]}:{addr[1]}"


def _refuse(process: asyncssh.SSHServerProcess[bytes], message: bytes) -> None:
    process.stderr.write(message)  # bytes: the sessions run with encoding=None
    process.exit(1)


class _Connection(asyncssh.SSHServer):
    """One client connection: authentication and the refusals of everything but sessions."""

    def __init__(self, gateway: SshGateway) -> None:
        self.gw = gateway
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = ""
        self.username = ""
        self.user = ""  # set once logged in

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.peer = _peer(conn.get_extra_info("peername"))
        self.gw.metrics.sessions.inc()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gw.metrics.sessions.inc(-1)
        if self.user:
            conns = self.gw.connections.get(self.user)
            if conns is not None and self.conn is not None:
                conns.discard(self.conn)
                if not conns:
                    del self.gw.connections[self.user]
            log.info("ssh logout", extra={"user": self.user, "peer": self.peer})
        elif self.username:
            log.info("ssh connection closed without a login", extra={"user": self.username, "peer": self.peer})

    def begin_auth(self, username: str) -> bool:
        self.username = username
        return True  # always ask for a key: refusing here would tell which users exist

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        acct = self.gw.accounts.get(username)
        if acct is not None and acct.enabled and acct.key_blob == bytes(key.public_data):
            return True
        reason = "unknown user" if acct is None else "account disabled" if not acct.enabled else "key not accepted"
        self.gw.metrics.logins.inc(result="refused")
        log.info("ssh login refused: %s", reason, extra={"user": username[:64], "peer": self.peer})
        return False

    def auth_completed(self) -> None:
        assert self.conn is not None
        self.user = self.conn.get_extra_info("username")
        self.gw.connections.setdefault(self.user, set()).add(self.conn)
        self.gw.metrics.logins.inc(result="ok")
        log.info("ssh login", extra={"user": self.user, "peer": self.peer})

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        refused(
            self.gw.metrics, "forward", f"port forwarding to {dest_host}:{dest_port}", user=self.user, peer=self.peer
        )
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        refused(
            self.gw.metrics,
            "forward",
            f"remote port forwarding from {listen_host}:{listen_port}",
            user=self.user,
            peer=self.peer,
        )
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        refused(self.gw.metrics, "forward", f"forwarding to socket {dest_path}", user=self.user, peer=self.peer)
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        refused(self.gw.metrics, "forward", f"remote socket forwarding {listen_path}", user=self.user, peer=self.peer)
        return False


def fingerprint(key: asyncssh.SSHKey) -> str:
    """``SHA256:...`` as OpenSSH shows it."""
    return str(key.get_fingerprint("sha256"))
