"""Starting a service: its gRPC server with the guard, limits and health; readiness; running it until a signal.

``create_server(cfg, name, setup)`` is every service's ``build``, in the shape
of grpc's examples (it returns the running server with its bound port, and a
cleanup). ``setup`` opens what the service needs on an ``AsyncExitStack``,
pushing each resource's close right after opening it, and returns the
servicer's ``Wiring``; then the server binds and starts. A failure anywhere
closes what was opened so far, in reverse order; the cleanup stops the server
first and closes the rest the same way.

Health: the standard gRPC health service on the same port. With a readiness
check in the wiring it reports NOT_SERVING until the check passes and again
while it fails, for the service's name and for "" (the whole server); the
check runs every ``ready_every`` seconds while serving and every
``RETRY_EVERY`` while not, and each change is logged with its reason.
Without one the server reports SERVING once started.

``start_server`` binds with TLS when ``cfg.internal_tls``; a port in use is an
OSError (the service exits 1). ``run_service`` serves the metrics beside it
and stops everything gracefully on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import net, tls
from services.common.config import Config
from services.common.limits import Limiter
from services.common.metrics import Registry, serve_metrics
from services.common.readiness import Readiness, Ready
from services.common.rpc import Guard, GuardInterceptor, Policy

log = logging.getLogger(__name__)

READY_EVERY = 5.0  # seconds between readiness checks while serving
RETRY_EVERY = 1.0  # ... while not serving, so a recovery shows soon
CHECK_TIMEOUT = 15.0  # a readiness check taking longer counts as failed
STOP_GRACE = 5.0  # seconds calls in flight get when the service is told to stop

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Cleanup = Callable[[], Awaitable[None]]
Register = Callable[[grpc.aio.Server], Iterable[str]]


@dataclass(frozen=True)
class Wiring:
    """What a service's setup hands ``create_server``: its servicer, who may call what, when it can serve."""

    service: str  # full gRPC name, e.g. gridstor.v1.MetaService
    add: Callable[[grpc.aio.Server], object]  # e.g. lambda server: add_MetaServiceServicer_to_server(s, server)
    policy: Policy = field(default_factory=Policy)
    ready: Readiness | None = None


class HealthWatch:
    """Keeps a server's health statuses in step with a readiness check (see the module docstring)."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,  # type: ignore[name-defined]
        names: Iterable[str],
        check: Readiness,
        *,
        label: str,
        every: float = READY_EVERY,
    ) -> None:
        self.servicer = servicer
        self.names = [*names, ""]
        self.check = check
        self.label = label
        self.every = every
        self.state: Ready | None = None
        self._served = False  # whether it has been SERVING before (for the log)
        self._task: asyncio.Task[None] | None = None

    async def update(self) -> Ready:
        """Run the check once and set the statuses (logging a change)."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                ready = await self.check()
        except TimeoutError:
            ready = Ready(False, f"the readiness check took over {CHECK_TIMEOUT:g}s")
        except Exception as exc:  # a failing check means not ready; the reason is logged below
            ready = Ready(False, f"the readiness check failed: {type(exc).__name__}: {exc}")
        if ready != self.state:
            if ready.serving:
                log.info("%s serving%s", self.label, " again" if self._served else "")
                self._served = True
            elif self._served:
                log.warning("%s not serving: %s", self.label, ready.reason)
            else:  # still starting (e.g. ingest's workers): worth a line, not a warning
                log.info("%s not serving yet: %s", self.label, ready.reason)
            self.state = ready
            for name in self.names:
                await self.servicer.set(name, SERVING if ready.serving else NOT_SERVING)
        return ready

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.label}-readiness")

    async def _run(self) -> None:
        while True:
            serving = self.state is not None and self.state.serving
            await asyncio.sleep(self.every if serving else min(self.every, RETRY_EVERY))
            await self.update()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


@dataclass
class Running:
    """A started server: its bound port, its health servicer, what ``stop`` closes."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer  # type: ignore[name-defined]
    limiter: Limiter | None = None
    watch: HealthWatch | None = None

    async def stop(self, grace: float | None = None) -> None:
        """Stop watching readiness, stop the server (a no-op when stopped already), close the limiter."""
        if self.watch is not None:
            await self.watch.stop()
        await self.server.stop(grace)
        if self.limiter is not None:
            await self.limiter.close()


async def start_server(
    cfg: Config,
    guard: Guard,
    register: Register,
    *,
    port: int,
    host: str | None = None,
    ready: Readiness | None = None,
    ready_every: float = READY_EVERY,
    label: str = "service",
    options: Sequence[tuple[str, int]] = (),
) -> Running:
    """Bind and start a server; ``register`` adds servicers and returns their full names.

    The port speaks TLS when ``cfg.internal_tls`` (tls.TlsError naming a missing or expired file
    otherwise); the guard gets the config's limits unless it has a limiter already. With ``ready``
    the health statuses follow that check (its first run is before the server starts).
    """
    credentials = None
    if cfg.internal_tls:
        key, chain = tls.server_pair(cfg)
        credentials = grpc.ssl_server_credentials([(key, chain)])
    if guard.limiter is None:
        guard.limiter = Limiter(cfg.limits, cfg.redis_url)
    server = grpc.aio.server(
        interceptors=[GuardInterceptor(guard)],
        options=[
            ("grpc.max_receive_message_length", net.MAX_MESSAGE),
            ("grpc.max_send_message_length", net.MAX_MESSAGE),
            # Headers: whatever the edge lets through (config.LimitsConfig), so no service refuses them on its own.
            ("grpc.max_metadata_size", cfg.limits.service_metadata_bytes),
            ("grpc.absolute_max_metadata_size", cfg.limits.service_metadata_bytes),
            ("grpc.so_reuseport", 0),
            # No BDP probing: it grows every stream's receive window to several MiB, which the core fills
            # whether the handler reads or not (100 uploads took ingest to ~500 MiB; ~170 MiB without).
            # The cost, on loopback: one big upload is received ~15-20% slower (docs/resilience.md).
            ("grpc.http2.bdp_probe", 0),
            *options,
        ],
    )
    names = list(register(server))
    hs = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    address = net.hostport(host or cfg.listen_host, port)
    try:
        bound = (
            server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
        )
    except RuntimeError:  # grpc says only "Failed to bind"; its core logs the reason (usually: in use)
        raise OSError(errno.EADDRINUSE, f"cannot listen on {address} (port in use?)") from None
    running = Running(server, bound, hs, guard.limiter)
    if ready is None:
        for name in [*names, ""]:
            await hs.set(name, SERVING)
    else:
        running.watch = HealthWatch(hs, names, ready, label=label, every=ready_every)
        await running.watch.update()
    await server.start()
    if running.watch is not None:
        running.watch.start()
    return running


async def create_server(
    cfg: Config,
    name: str,
    setup: Callable[[contextlib.AsyncExitStack], Awaitable[Wiring]],
    *,
    port: int | None = None,
    ready_every: float = READY_EVERY,
    options: Sequence[tuple[str, int]] = (),
) -> tuple[Running, Cleanup]:
    """Open the service (``setup``), start its server on ``port`` (None: the configured one); (running, cleanup).

    ``options``: more gRPC server options (ingest's receive window).
    """
    stack = contextlib.AsyncExitStack()
    try:
        wiring = await setup(stack)

        def register(server: grpc.aio.Server) -> list[str]:
            wiring.add(server)
            return [wiring.service]

        running = await start_server(
            cfg,
            Guard.for_config(cfg, {wiring.service: wiring.policy}),
            register,
            port=cfg.ports[name] if port is None else port,
            ready=wiring.ready,
            ready_every=ready_every,
            label=name,
            options=options,
        )
        stack.push_async_callback(running.stop, 1.0)  # first out: the server stops before what it uses closes
    except BaseException:
        await stack.aclose()
        raise
    return running, stack.aclose


async def run_service(
    name: str,
    cfg: Config,
    build: Callable[[], Awaitable[tuple[Running, Cleanup]]],
    registry: Registry,
) -> None:
    """Start via ``build`` (returns the server and a cleanup), serve metrics, stop on a signal."""
    running, cleanup = await build()
    metrics_port = cfg.ports[name] + cfg.metrics_port_offset
    ssl_context = tls.server_ssl_context(cfg) if cfg.internal_tls else None
    try:
        metrics = await serve_metrics(registry, cfg.listen_host, metrics_port, ssl=ssl_context)
    except BaseException:
        await cleanup()
        raise
    log.info(
        "%s listening",
        name,
        extra={"grpc": f"{cfg.listen_host}:{running.port}", "metrics": metrics_port, "tls": cfg.internal_tls},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s stopping", name)
    await running.health.enter_graceful_shutdown()
    await running.server.stop(STOP_GRACE)
    metrics.close()
    try:
        await cleanup()
    except Exception:  # the process is ending anyway; say what did not close cleanly
        log.warning("%s: cleanup after stopping failed", name, exc_info=True)
