"""SshService over grpc.aio (accounts, home sizes, Process) next to the SSH server it manages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from gridstor.v1 import ssh_pb2, ssh_pb2_grpc
from services.common import errors, homes, jobs, readiness, spool
from services.common.accounts import Account, check_username
from services.common.config import Config, SshConfig
from services.common.gateway import refuse_on_replica
from services.common.jobs import JobStore, Notifier
from services.common.keys import signing_key
from services.common.metrics import Registry
from services.common.replay import RedisReplayGuard
from services.common.rpc import Policy, current_caller
from services.common.server import READY_EVERY, Cleanup, Running, Wiring, create_server
from services.ssh import guard
from services.ssh.accounts import AccountStore, ensure_home
from services.ssh.audit import SshMetrics
from services.ssh.ownership import PROOF_REPLAY_PREFIX, Allowed, Ownership, Proof
from services.ssh.processing import Processor
from services.ssh.rrsync import find_rrsync
from services.ssh.server import SshGateway, fingerprint, load_host_key

log = logging.getLogger(__name__)

NAME = "ssh"
SHOWN_PATHS = 100  # paths a resize reply lists of what the next cleanup sweep removes
SERVICE = ssh_pb2.DESCRIPTOR.services_by_name["SshService"].full_name
POLICY = Policy()  # every method needs a token unless the gateway is public; then ownership.py decides

Context = grpc.aio.ServicerContext[Any, Any]


def _proof(request: Any) -> Proof | None:
    """The request's AccountProof, None when it carries none."""
    if not request.HasField("proof"):
        return None
    p = request.proof
    return Proof(p.epoch, p.nonce, p.signature)


class SshServicer(ssh_pb2_grpc.SshServiceServicer):
    """Unpacks requests, checks who may act on the account (ownership.py), calls the gateway / processor."""

    def __init__(
        self,
        gateway: SshGateway,
        processor: Processor,
        ownership: Ownership,
        settings: SshConfig,
        host_fp: str,
        cfg: Config,
    ) -> None:
        self.cfg = cfg
        self.gateway = gateway
        self.processor = processor
        self.ownership = ownership
        self.settings = settings
        self.host_fp = host_fp

    async def _allow(self, method: str, username: str, request: Any) -> tuple[Account | None, Allowed]:
        """The account (None: no such account) and how the caller may act on it; PermissionDenied if not."""
        acct = self.gateway.accounts.get(check_username(username))
        if acct is None and method != "EnableAccount":
            if method == "DisableAccount":
                return None, Allowed("new")  # nothing to disable: answered existed=false
            raise errors.NotFound(f"no SSH account {username!r}")
        caller = current_caller.get()
        allowed = await self.ownership.allow(method, username, acct, caller, _proof(request))
        log.info(
            "%s allowed",
            method,
            extra={"user": username, "caller": caller.identity, "how": allowed.how},
        )
        return acct, allowed

    async def EnableAccount(
        self, request: ssh_pb2.EnableAccountRequest, context: Context
    ) -> ssh_pb2.EnableAccountReply:
        """Create an account with a home folder, or update its key and size; say so when the home is over it."""
        old, allowed = await self._allow("EnableAccount", request.username, request)
        acct, created = await self.gateway.enable(
            request.username,
            request.public_key,
            request.max_size_mb,
            self.settings.default_max_size,
            expect=old,
            owner=allowed.owner,
        )
        _, home = await self.gateway.home_size(acct.username)
        reply = ssh_pb2.EnableAccountReply(
            username=acct.username,
            created=created,
            max_bytes=acct.max_bytes,
            host_key_fingerprint=self.host_fp,
            owner=acct.owner,
            used_bytes=home.held,
        )
        if home.held > acct.max_bytes:
            plan = await asyncio.to_thread(homes.preview_cleanup, home.root, acct.max_bytes)
            reply.over_limit.CopyFrom(self._over_limit(home.held, acct.max_bytes, plan))
            notice = reply.over_limit.notice
            log.warning("ssh home resized below what it holds: %s", notice, extra={"user": acct.username})
        return reply

    def _over_limit(self, held: int, max_bytes: int, plan: homes.Plan) -> ssh_pb2.HomeCleanup:
        """What the next sweep removes from a home over its limit, in fields and in one sentence."""
        removes = plan.removes
        interval = self.cfg.maint.cleanup_interval  # maint's sweeps; 0 = off
        when = (
            f"the next cleanup sweep (every {interval:g} s)"
            if interval > 0
            else "a cleanup sweep (maint.cleanup_interval is 0: sweeps are off)"
        )
        notice = (
            f"home holds {held} bytes, over its limit of {max_bytes}: {when} removes {len(removes)} files"
            f" ({plan.freed} bytes), oldest first"
        )
        if plan.used - plan.freed > max_bytes:
            notice += f", and it still holds {plan.used - plan.freed} bytes (folders and links are kept)"
        if held > plan.used:
            notice += f"; {held - plan.used} bytes are files removed but still open over SFTP"
        return ssh_pb2.HomeCleanup(
            files=len(removes), bytes=plan.freed, paths=[r.path for r in removes[:SHOWN_PATHS]], notice=notice
        )

    async def DisableAccount(
        self, request: ssh_pb2.DisableAccountRequest, context: Context
    ) -> ssh_pb2.DisableAccountReply:
        """Refuse further logins; the home is kept unless remove_home."""
        old, _ = await self._allow("DisableAccount", request.username, request)
        existed, removed = await self.gateway.disable(request.username, remove_home=request.remove_home, expect=old)
        return ssh_pb2.DisableAccountReply(username=request.username, existed=existed, home_removed=removed)

    async def HomeSize(self, request: ssh_pb2.HomeSizeRequest, context: Context) -> ssh_pb2.HomeSizeReply:
        """What the home holds (bytes on disk, entries) and its limits."""
        await self._allow("HomeSize", request.username, request)
        acct, home = await self.gateway.home_size(request.username)
        return ssh_pb2.HomeSizeReply(
            username=acct.username,
            used_bytes=home.held,
            max_bytes=acct.max_bytes,
            files=home.files,
            enabled=acct.enabled,
            owner=acct.owner,
            entries=home.entries,
            max_entries=home.max_entries,
        )

    async def Process(self, request: ssh_pb2.ProcessRequest, context: Context) -> ssh_pb2.ProcessReply:
        """Queue an upload job for a file or folder of the home (not of a disabled account)."""
        refuse_on_replica(self.cfg, "Process (storing a file of a home)")
        acct, _ = await self._allow("Process", request.username, request)
        if acct is not None and not acct.enabled:
            raise errors.Refused(
                f"SSH account {request.username!r} is disabled: enable it again before processing its home"
            )
        remove = request.remove if request.HasField("remove") else True
        done = await self.processor.process(request.username, request.path, remove=remove)
        return ssh_pb2.ProcessReply(job=done.job, path=done.rel or "/", directory=done.directory, name=done.name)


@dataclass
class SshService:
    """A started ssh service: the gRPC server, the SSH server's port and the parts tests look at."""

    running: Running
    ssh_port: int
    gateway: SshGateway
    processor: Processor
    settings: SshConfig
    state_dir: Path  # accounts, host key, pending removals
    host_key_fingerprint: str
    cleanup: Cleanup


async def start(
    cfg: Config,
    *,
    port: int | None = None,
    ssh_port: int | None = None,
    registry: Registry | None = None,
    ready_every: float = READY_EVERY,
) -> SshService:
    """Open accounts and Redis, start the SSH server and the gRPC server (ports None = configured).

    Serving while Redis (the job queue Process submits to) answers.
    """
    settings, state_dir = cfg.ssh, cfg.ssh_state_dir
    listen_host = settings.listen_host or cfg.listen_host
    opened: list[tuple[int, SshGateway, Processor, str]] = []

    async def setup(stack: contextlib.AsyncExitStack) -> Wiring:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        signing_key(cfg.data_dir)  # fail early on a bad key file
        accounts = AccountStore.open(state_dir)
        host_key = load_host_key(state_dir)
        host_fp = fingerprint(host_key)
        metrics = SshMetrics(registry or Registry())
        rrsync = find_rrsync(settings.rrsync, state_dir)
        unwatched = guard.probe() if rrsync is not None else None
        if unwatched is not None:
            log.error("rsync uploads are disabled: the quota guard cannot run here (%s)", unwatched)
        for acct in accounts:
            await asyncio.to_thread(ensure_home, settings.homes_dir, acct.username)
        spool.prepare_dir(cfg.spool_dir)
        redis = jobs.connect(cfg.redis_url)
        stack.push_async_callback(jobs.disconnect, redis)
        notifier = Notifier(redis)
        stack.push_async_callback(notifier.stop)
        gateway = SshGateway(accounts, settings, metrics, rrsync, unwatched)
        stack.push_async_callback(gateway.stop)
        processor = Processor(
            spool_dir=cfg.spool_dir,
            state_dir=state_dir,
            limit=cfg.max_upload,
            store=JobStore(redis),
            notifier=notifier,
            homes=gateway,
            metrics=metrics,
        )
        stack.push_async_callback(processor.stop)
        await notifier.start()
        bound_ssh = await gateway.start(listen_host, settings.port if ssh_port is None else ssh_port, host_key)
        resumed = processor.resume()
        log.info(
            "ssh started",
            extra={
                "ssh": f"{listen_host}:{bound_ssh}",
                "host_key": host_fp,
                "accounts": len(list(accounts)),
                "rsync": str(rrsync) if rrsync else "disabled",
                "rsync_uploads": "limited" if unwatched is None else f"disabled: {unwatched}",
                "pending_removals": resumed,
            },
        )
        opened.append((bound_ssh, gateway, processor, host_fp))
        ownership = Ownership(cfg.mode, RedisReplayGuard(redis, PROOF_REPLAY_PREFIX), cfg.auth_skew)
        servicer = SshServicer(gateway, processor, ownership, settings, host_fp, cfg)
        add = partial(ssh_pb2_grpc.add_SshServiceServicer_to_server, servicer)
        return Wiring(SERVICE, add, POLICY, partial(readiness.redis, redis, "job queue"))

    running, cleanup = await create_server(cfg, NAME, setup, port=port, ready_every=ready_every)
    bound_ssh, gateway, processor, host_fp = opened[0]
    return SshService(running, bound_ssh, gateway, processor, settings, state_dir, host_fp, cleanup)


async def build(
    cfg: Config, *, port: int | None = None, registry: Registry | None = None, ready_every: float = READY_EVERY
) -> tuple[Running, Cleanup]:
    """Start the service (see ``start``); return the gRPC server and an async cleanup."""
    svc = await start(cfg, port=port, registry=registry, ready_every=ready_every)
    return svc.running, svc.cleanup
