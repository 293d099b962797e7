"""The SSH server (asyncssh): key-only logins into SFTP/SCP/rsync-only homes.

* Authentication: public key only, against the account's one key. Every user,
  known or not, is offered publickey, so a refusal does not tell which
  usernames exist. Disabled accounts cannot log in; disabling (or replacing the
  key) closes the user's open connections.
* Sessions: the ``sftp`` subsystem and ``scp`` (both served by
  ``HomeSFTPServer``), and ``rsync --server ...`` run through rsync's own
  restricted wrapper under the quota guard (services/ssh/rsync.py). Shells,
  other commands, other subsystems, PTYs, port/agent/X11 forwarding are
  refused (and logged); so is a command with control characters (a NUL).
  At most ``MAX_SESSIONS`` sessions at a time per connection (OpenSSH's
  MaxSessions default).
* Connections that have not logged in: at most ``ssh.max_unauthenticated`` in
  all and ``ssh.max_unauthenticated_per_address`` from one address (more are
  closed at once), each closed after ``ssh.login_timeout``.
* Ciphers: AES only where the CPU has AES instructions, else chacha20-poly1305
  first (services/ssh/ciphers.py; ``ssh.ciphers`` overrides).
* The host key is generated once into ``DATA/ssh/host_key`` (ed25519, 0600).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import stat
from collections import Counter
from pathlib import Path
from typing import Any

import asyncssh

from services.common import errors
from services.common.accounts import Account, check_username, home_path
from services.common.config import SshConfig
from services.ssh import rsync
from services.ssh.accounts import MAX_SIZE_MB, MIB, AccountStore, ensure_home
from services.ssh.audit import SshMetrics, refused
from services.ssh.ciphers import offered
from services.ssh.home import Home
from services.ssh.rsync import refuse as _refuse
from services.ssh.sftp import HomeSFTPServer, install_sftp_fixes

log = logging.getLogger(__name__)

HOST_KEY_FILE = "host_key"
MAX_SESSIONS = 10  # sessions (channels) open at a time on one connection, as OpenSSH's MaxSessions
SFTP_VERSION = 3  # what asyncssh's server offers by default (open56 is refused)
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
        settings: SshConfig,
        metrics: SshMetrics,
        rrsync: Path | None,
        unwatched: str | None = None,
    ) -> None:
        self.accounts = accounts
        self.settings = settings
        self.homes_dir = settings.homes_dir
        self.metrics = metrics
        self.rrsync = rrsync
        self.unwatched = unwatched  # why rsync cannot run under the quota guard here (None: it can)
        self.homes: dict[str, Home] = {}
        self.connections: dict[str, set[asyncssh.SSHServerConnection]] = {}
        self.pending: Counter[str] = Counter()  # connections not logged in yet, per client address
        self.tasks: set[asyncio.Task[Any]] = set()
        self.acceptor: asyncssh.SSHAcceptor | None = None
        install_sftp_fixes()

    def home(self, username: str) -> Home:
        """The home of an existing account (one shared object per user)."""
        acct = self.accounts.get(username)
        if acct is None:
            raise errors.NotFound(f"no SSH account {username!r}")
        home = self.homes.get(username)
        if home is None:
            root = home_path(self.homes_dir, username)
            home = self.homes[username] = Home(username, root, acct.max_bytes, self.settings.max_entries)
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
        ciphers, why = offered(self.settings.ciphers)
        log.info("SSH ciphers offered: %s (%s)", ", ".join(ciphers), why)
        self.acceptor = await asyncssh.create_server(
            lambda: _Connection(self),
            host,
            port,
            server_host_keys=[host_key],
            encoding=None,  # sessions come from _Connection.session_requested (counted there)
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
            password_auth=False,
            kbdint_auth=False,
            host_based_auth=False,
            gss_host=None,
            line_editor=False,
            keepalive_interval=60,
            login_timeout=self.settings.login_timeout,
            encryption_algs=list(ciphers),
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
                refused(self.metrics, "subsystem", f"subsystem {process.subsystem[:100]!r}", user=user, peer=peer)
                _refuse(process, f"subsystem {process.subsystem[:100]!r} is not available here; use sftp.\n".encode())
                return
            command = process.command
            if command is None:
                refused(self.metrics, "shell", "interactive shell", user=user, peer=peer)
                _refuse(process, NOT_A_SHELL)
                return
            if any(ord(c) < 32 and c != "\t" for c in command):
                why = f"command with control characters {command[:200]!r}"
                refused(self.metrics, "exec", why, user=user, peer=peer)
                _refuse(process, b"the command holds control characters (a NUL?); nothing was run\n")
                return
            try:
                argv = shlex.split(command)
            except ValueError:
                argv = []
            if argv[:2] == ["rsync", "--server"]:
                if self.rrsync is None:
                    _refuse(process, b"rsync is not available on this server (rrsync is missing)\n")
                    return
                await rsync.serve(
                    process,
                    self.home(user),
                    command,
                    rrsync=self.rrsync,
                    watched=self.unwatched is None,
                    metrics=self.metrics,
                    peer=peer,
                    after_push=lambda home: self.background(_after_push(home)),
                )
                return
            refused(self.metrics, "exec", f"command {command[:200]!r}", user=user, peer=peer)
            _refuse(process, NOT_A_SHELL)
        except errors.NotFound:  # the account went away meanwhile
            _refuse(process, b"this account is no longer enabled\n")


async def _after_push(home: Home) -> None:
    """rsync writes outside the SFTP hooks: recount, and say so when the home is over its size."""
    await home.refresh(force=True)
    if home.used > home.max_bytes:
        log.warning(
            "home is over its maximum size after an rsync push; maint removes the oldest files",
            extra={"user": home.username, "used": home.used, "max_bytes": home.max_bytes},
        )


class _Session(asyncssh.SSHServerProcess[bytes]):
    """asyncssh's own session (sftp and scp served by HomeSFTPServer, the rest by SshGateway._process),
    counted against its connection's MAX_SESSIONS until its channel closes."""

    def __init__(self, owner: _Connection, process_factory: Any, sftp_factory: Any) -> None:
        super().__init__(process_factory, sftp_factory, SFTP_VERSION, True)
        self.owner = owner

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.sessions -= 1
        super().connection_lost(exc)


def _peer(addr: Any) -> str:
    if not addr:
        return ""
    return f"{addr[0]}:{addr[1]}"


class _Connection(asyncssh.SSHServer):
    """One client connection: authentication and the refusals of everything but sessions."""

    def __init__(self, gateway: SshGateway) -> None:
        self.gw = gateway
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = ""
        self.address = ""
        self.username = ""
        self.user = ""  # set once logged in
        self.pending = False  # counted among the connections not logged in yet
        self.dropped = False  # closed at once: too many connections not logged in
        self.sessions = 0

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        addr = conn.get_extra_info("peername")
        self.peer = _peer(addr)
        self.address = str(addr[0]) if addr else ""
        gw, cfg = self.gw, self.gw.settings
        total, mine = sum(gw.pending.values()), gw.pending[self.address]
        if total >= cfg.max_unauthenticated or mine >= cfg.max_unauthenticated_per_address:
            self.dropped = True
            refused(
                gw.metrics,
                "connection",
                "too many connections not logged in yet: closed at once",
                peer=self.peer,
                from_address=mine,
                total=total,
            )
            asyncio.get_running_loop().call_soon(conn.abort)
            return
        gw.pending[self.address] += 1
        self.pending = True
        gw.metrics.sessions.inc()

    def _logged_in_or_gone(self) -> None:
        if self.pending:
            self.pending = False
            self.gw.pending[self.address] -= 1
            if self.gw.pending[self.address] <= 0:
                del self.gw.pending[self.address]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.dropped:
            return
        self._logged_in_or_gone()
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
        elif exc is not None and "timeout" in str(exc).lower():
            log.info("ssh connection closed: %s", exc, extra={"peer": self.peer})

    def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
        """A session (sftp, scp, rsync or a refusal), or False past MAX_SESSIONS open on this connection."""
        if self.sessions >= MAX_SESSIONS:
            why = f"more than {MAX_SESSIONS} sessions at once"
            refused(self.gw.metrics, "session", why, user=self.user, peer=self.peer)
            return False
        self.sessions += 1
        return _Session(self, self.gw._process, self.gw._sftp)

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
        self._logged_in_or_gone()
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
