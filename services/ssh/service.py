"""SshService over grpc.aio (accounts, home sizes, Process) next to the SSH server it manages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gridstor.v1 import ssh_pb2, ssh_pb2_grpc
from services.common import jobs, spool
from services.common.accounts import check_username
from services.common.config import Config, SshConfig
from services.common.jobs import JobStore, Notifier
from services.common.keys import signing_key
from services.common.metrics import Registry
from services.common.rpc import Guard, Policy, Running, current_identity, start_server
from services.ssh.accounts import AccountStore, ensure_home
from services.ssh.audit import SshMetrics
from services.ssh.processing import Processor
from services.ssh.rrsync import find_rrsync
from services.ssh.server import SshGateway, fingerprint, load_host_key

log = logging.getLogger(__name__)

NAME = "ssh"
SERVICE = ssh_pb2.DESCRIPTOR.services_by_name["SshService"].full_name
POLICY = Policy()  # every method needs a token unless the gateway is public

Context = grpc.aio.ServicerContext[Any, Any]


class SshServicer(ssh_pb2_grpc.SshServiceServicer):
    """Unpacks requests, calls the gateway / processor, builds replies."""

    def __init__(self, gateway: SshGateway, processor: Processor, settings: SshConfig, host_fp: str) -> None:
        self.gateway = gateway
        self.processor = processor
        self.settings = settings
        self.host_fp = host_fp

    async def EnableAccount(
        self, request: ssh_pb2.EnableAccountRequest, context: Context
    ) -> ssh_pb2.EnableAccountReply:
        """Create an account with a home folder, or update its key and size."""
        acct, created = await self.gateway.enable(
            request.username, request.public_key, request.max_size_mb, self.settings.default_max_size
        )
        log.info("EnableAccount", extra={"user": acct.username, "caller": current_identity.get()})
        return ssh_pb2.EnableAccountReply(
            username=acct.username, created=created, max_bytes=acct.max_bytes, host_key_fingerprint=self.host_fp
        )

    async def DisableAccount(
        self, request: ssh_pb2.DisableAccountRequest, context: Context
    ) -> ssh_pb2.DisableAccountReply:
        """Refuse further logins; the home is kept unless remove_home."""
        existed, removed = await self.gateway.disable(request.username, remove_home=request.remove_home)
        log.info("DisableAccount", extra={"user": request.username, "caller": current_identity.get()})
        return ssh_pb2.DisableAccountReply(username=request.username, existed=existed, home_removed=removed)

    async def HomeSize(self, request: ssh_pb2.HomeSizeRequest, context: Context) -> ssh_pb2.HomeSizeReply:
        """Bytes used in the home and its maximum."""
        acct, home = await self.gateway.home_size(request.username)
        return ssh_pb2.HomeSizeReply(
            username=acct.username,
            used_bytes=home.used,
            max_bytes=acct.max_bytes,
            files=home.files,
            enabled=acct.enabled,
        )

    async def Process(self, request: ssh_pb2.ProcessRequest, context: Context) -> ssh_pb2.ProcessReply:
        """Queue an upload job for a file or folder of the home."""
        remove = request.remove if request.HasField("remove") else True
        self.gateway.home(check_username(request.username))  # NotFound before any work for an unknown account
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
    cleanup: Callable[[], Awaitable[None]]


async def start(
    cfg: Config, *, port: int | None = None, ssh_port: int | None = None, registry: Registry | None = None
) -> SshService:
    """Open accounts and Redis, start the SSH server and the gRPC server (ports None = configured)."""
    settings, state_dir = cfg.ssh, cfg.ssh_state_dir
    listen_host = settings.listen_host or cfg.listen_host
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    signing_key(cfg.data_dir)  # fail early on a bad key file
    accounts = AccountStore.open(state_dir)
    host_key = load_host_key(state_dir)
    host_fp = fingerprint(host_key)
    metrics = SshMetrics(registry or Registry())
    rrsync = find_rrsync(settings.rrsync, state_dir)
    for acct in accounts:
        await asyncio.to_thread(ensure_home, settings.homes_dir, acct.username)
    spool.prepare_dir(cfg.spool_dir)
    redis = jobs.connect(cfg.redis_url)
    store = JobStore(redis)
    notifier = Notifier(redis)
    gateway = SshGateway(accounts, settings.homes_dir, metrics, rrsync)
    processor = Processor(
        spool_dir=cfg.spool_dir,
        state_dir=state_dir,
        limit=cfg.max_upload,
        store=store,
        notifier=notifier,
        homes=gateway,
        metrics=metrics,
    )

    async def close() -> None:
        await processor.stop()
        await gateway.stop()
        await notifier.stop()
        with contextlib.suppress(Exception):
            await redis.aclose()

    try:
        await notifier.start()
        bound_ssh = await gateway.start(listen_host, settings.port if ssh_port is None else ssh_port, host_key)
        resumed = processor.resume()
        servicer = SshServicer(gateway, processor, settings, host_fp)
        guard = Guard.for_config(cfg, {SERVICE: POLICY})

        def register(server: grpc.aio.Server) -> list[str]:
            ssh_pb2_grpc.add_SshServiceServicer_to_server(servicer, server)
            return [SERVICE]

        running = await start_server(cfg, guard, register, port=cfg.ports[NAME] if port is None else port)
    except BaseException:
        await close()
        raise
    log.info(
        "ssh ready",
        extra={
            "ssh": f"{listen_host}:{bound_ssh}",
            "host_key": host_fp,
            "accounts": len(list(accounts)),
            "rsync": str(rrsync) if rrsync else "disabled",
            "pending_removals": resumed,
        },
    )

    async def cleanup() -> None:
        # run_service has stopped the server gracefully already; a second stop is a no-op there.
        await running.server.stop(1)
        await close()

    return SshService(running, bound_ssh, gateway, processor, settings, state_dir, host_fp, cleanup)


async def build(
    cfg: Config, *, port: int | None = None, registry: Registry | None = None
) -> tuple[Running, Callable[[], Awaitable[None]]]:
    """Start the service (see ``start``); return the gRPC server and an async cleanup."""
    svc = await start(cfg, port=port, registry=registry)
    return svc.running, svc.cleanup
