"""rsync over SSH: the server side runs through rrsync, under the quota guard, with its messages cleaned.

* The command: only ``rsync --server ...``. Before rrsync sees it,
  ``--preallocate`` (it would allocate past the quota), ``--stderr=...`` and
  ``--no-msgs2stderr`` (they send the server's errors around the filter below)
  are dropped and batch files are refused.
* rrsync (``-munge -no-lock HOME``) checks the rest and confines rsync to the
  home (symlinks it stores are munged, devices refused); rsync runs under
  services/ssh/guard.py, which holds whatever the options ask: the quota, the
  entry limit, the home's own mode, no set-id bits, no foreign owners (rsync
  runs as root: its chown calls succeed without effect), only ``user.*``
  extended attributes. Where this kernel cannot run the guard, uploads are refused.
* stderr goes to the client line by line with server paths taken out (the
  home's path, rrsync's /proc/self/fd/N pins, the rrsync program's path); after
  rsync's "File too large" or "Disk quota exceeded" comes a line naming the quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh

from services.common import errors
from services.ssh import guard
from services.ssh.audit import SshMetrics
from services.ssh.home import Home

log = logging.getLogger(__name__)

PUMP_BLOCK = 256 * 1024
MAX_LINE = 64 * 1024  # a longer stderr line is passed on in pieces
_TOKEN = re.compile(r"(?:[^\s\\]+|\\.[^\s\\]*)+")  # how rrsync splits the command
# long options whose value may come as the next word (rrsync's list, those with an argument)
_VALUED = frozenset({
    "backup-dir", "block-size", "bwlimit", "checksum-choice", "checksum-seed", "compare-dest", "compress-choice",
    "compress-level", "compress-threads", "copy-dest", "files-from", "groupmap", "iconv", "info", "link-dest",
    "log-file", "log-format", "max-alloc", "max-delete", "max-size", "min-size", "modify-window", "only-write-batch",
    "partial-dir", "skip-compress", "stderr", "suffix", "temp-dir", "timeout", "usermap",
})  # fmt: skip
_DROPPED = frozenset({"preallocate", "stderr", "no-msgs2stderr"})
_REFUSED = {
    "only-write-batch": "batch files are not available on this server",
    "write-batch": "batch files are not available on this server",
    "read-batch": "batch files are not available on this server",
}
_PINNED = re.compile(rb"/proc/(?:self|thread-self|\d+)/fd/\d+(?:/|\b)")
_QUOTA_SIGNS = (b"File too large (27)", b"Disk quota exceeded (122)")


def server_command(command: str) -> str:
    """The command rrsync runs for the client's ``rsync --server ...`` (Refused: what cannot be served)."""
    if any(ord(c) < 32 and c not in "\t" for c in command):
        raise errors.Refused("the rsync command holds control characters")
    words = command.split(" ", 2)
    rest = words[2] if len(words) > 2 else ""
    kept: list[str] = []
    tokens = _TOKEN.findall(rest)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == ".":
            break
        i += 1
        if not tok.startswith("--"):
            kept.append(tok)
            continue
        name, eq, _ = tok[2:].partition("=")
        takes_next = not eq and name in _VALUED and i < len(tokens)
        if name in _REFUSED:
            raise errors.Refused(f"--{name}: {_REFUSED[name]}")
        if name in _DROPPED:
            i += 1 if takes_next else 0
            continue
        kept.append(tok)
        if takes_next:
            kept.append(tokens[i])
            i += 1
    return " ".join(["rsync", "--server", *kept, *tokens[i:]])


class ErrorFilter:
    """rsync's and rrsync's stderr with server paths taken out, whole lines at a time."""

    def __init__(self, home: Home, rrsync: Path, quota: Callable[[], str]) -> None:
        roots = {str(home.root), os.path.realpath(home.root)}
        self._roots = sorted((os.fsencode(r) for r in roots), key=len, reverse=True)
        programs = {os.fsencode(str(rrsync)), os.fsencode(os.path.realpath(rrsync))}
        self._programs = sorted(programs, key=len, reverse=True)
        self._quota = quota
        self._told = False
        self._buf = b""
        self.sent = 0  # bytes passed on

    def feed(self, data: bytes) -> bytes:
        """The complete lines received so far, cleaned (a line over MAX_LINE goes in pieces)."""
        *lines, self._buf = (self._buf + data).split(b"\n")
        out = b"".join(self.line(line + b"\n") for line in lines)
        if len(self._buf) > MAX_LINE:
            out += self.line(self._buf)
            self._buf = b""
        return out

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        return self.line(rest) if rest else b""

    def line(self, line: bytes) -> bytes:
        for root in self._roots:
            line = line.replace(root + b"/", b"").replace(root, b".")
        for program in self._programs:
            line = line.replace(program, b"rrsync")
        line = _PINNED.sub(b"", line)
        if not self._told and any(sign in line for sign in _QUOTA_SIGNS):
            self._told = True
            line += f"rsync: {self._quota()}\n".encode()
        self.sent += len(line)
        return line


async def serve(
    process: asyncssh.SSHServerProcess[bytes],
    home: Home,
    command: str,
    *,
    rrsync: Path,
    watched: bool,
    metrics: SshMetrics,
    peer: str,
    after_push: Callable[[Home], None],
) -> None:
    """Run one ``rsync --server`` session for ``home`` (``watched``: this kernel can run the guard)."""
    pull = command.split(" ")[2:3] == ["--sender"]
    try:
        rewritten = server_command(command)
    except errors.Refused as exc:
        refuse(process, f"rsync: {exc}\n".encode())
        return
    if not pull:
        if not watched:
            refuse(process, b"rsync: uploads are not available on this server (its kernel cannot limit them)\n")
            return
        await home.refresh(force=home.recount_due)  # the kernel will hold rsync to this count: a recent one
        if home.held >= home.max_bytes or home.entries >= home.max_entries:
            metrics.quota.inc()
            why = home.message() if home.held >= home.max_bytes else home.entries_message()
            refuse(process, f"rsync: {why}\n".encode())
            return
    metrics.rsync.inc(direction="pull" if pull else "push")
    client = process.get_extra_info("peername") or ("", 0)
    local = process.get_extra_info("sockname") or ("", 0)
    env = {
        "SSH_ORIGINAL_COMMAND": rewritten,
        "SSH_CONNECTION": f"{client[0]} {client[1]} {local[0]} {local[1]}",
        "PATH": "/usr/bin:/bin",
        "HOME": str(home.root),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",  # rrsync is a Python script: no cache files anywhere
    }
    argv = [str(rrsync), "-munge", "-no-lock", str(home.root)]
    parent: socket.socket | None = None
    child: socket.socket | None = None
    pass_fds: tuple[int, ...] = ()
    if watched:
        parent, child = socket.socketpair()
        argv = [*guard.jail_command(child), *argv]
        pass_fds = (child.fileno(),)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=home.root,
            env=env,
            start_new_session=True,
            pass_fds=pass_fds,
        )
    finally:
        if child is not None:
            child.close()
    watch: guard.Watch | None = None
    try:
        if parent is not None:
            watch = guard.Watch(await guard.receive_listener(parent), home, peer)
            watch.start()
    except BaseException as exc:
        _kill(proc)  # not reaped yet: its group is still there
        await proc.communicate()
        if not isinstance(exc, OSError):
            raise
        log.error("rsync could not start under the quota guard: %s", exc, extra={"user": home.username})
        refuse(process, b"rsync: the server could not start rsync under its quota guard\n")
        return
    finally:
        if parent is not None:
            parent.close()
    log.info("rsync started", extra={"user": home.username, "peer": peer, "pull": pull, "pid": proc.pid})
    errors_out = ErrorFilter(home, rrsync, home.refusal)
    try:
        await _run(process, proc, errors_out, home, peer)
        log.info(
            "rsync ended",
            extra={
                "user": home.username,
                "peer": peer,
                "pull": pull,
                "rc": proc.returncode,
                "stderr_bytes": errors_out.sent,
                "quota_refusals": watch.quota_refusals if watch is not None else 0,
            },
        )
    finally:
        if watch is not None:
            if watch.outside:
                log.warning("rsync wrote outside the home: refused", extra={"user": home.username, "peer": peer})
            watch.close()
        if not pull:
            home.invalidate()
            after_push(home)


async def _run(
    process: asyncssh.SSHServerProcess[bytes],
    proc: asyncio.subprocess.Process,
    errors_out: ErrorFilter,
    home: Home,
    peer: str,
) -> None:
    """Pump the client's bytes to rsync and rsync's back until either side ends; then the exit status."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    # Own pumps rather than process.redirect: the exit status goes out only after rsync's last byte.
    feed = asyncio.ensure_future(_pump_in(process.stdin, proc.stdin))
    outputs = asyncio.gather(_pump_out(proc.stdout, process.stdout), _pump_out(proc.stderr, process.stderr, errors_out))
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
        if proc.returncode is None or not outputs.done():  # someone of rsync's group is still there
            _kill(proc)  # all of them: rsync forks, and a process stopped by the guard holds the pipes open
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


async def _pump_out(
    src: asyncio.StreamReader, dst: asyncssh.SSHWriter[bytes], clean: ErrorFilter | None = None
) -> None:
    """rsync's stdout or stderr (``clean``: through the filter) to the client, until rsync closes it."""
    while data := await src.read(PUMP_BLOCK):
        if clean is not None:
            data = clean.feed(data)
            if not data:
                continue
        dst.write(data)
        await dst.drain()
    if clean is not None and (rest := clean.flush()):
        dst.write(rest)
        await dst.drain()


def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL rsync's whole process group (its own session: rrsync, rsync, the receiver it forks).

    Only while a member is alive (the group's id is not free for reuse then)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def refuse(process: asyncssh.SSHServerProcess[bytes], message: bytes) -> None:
    """Say why on stderr (bytes: the sessions run with encoding=None) and exit 1."""
    process.stderr.write(message)
    process.exit(1)
