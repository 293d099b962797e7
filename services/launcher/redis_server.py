"""How the configured redis URL is served: our own redis-server (a unix socket or a local port) or an external one."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redis

from services.launcher.errors import LaunchError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SUN_PATH_MAX = 107  # bytes of a unix socket path (struct sockaddr_un.sun_path, minus the NUL)


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

    def answers(self, timeout: float = 0.5) -> bool:
        """Whether a redis server answers PING there now."""
        with contextlib.suppress(redis.RedisError, OSError), self.client(timeout) as client:
            return bool(client.ping())
        return False


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


def _q(text: str) -> str:
    """A quoted redis.conf argument (JSON's string quoting is what redis.conf reads)."""
    return json.dumps(text, ensure_ascii=False)


# An upload is acknowledged (its job id returned) only once its job is in Redis; ``always`` fsyncs the
# append-only file before Redis answers a write, so an acknowledged job survives a power cut, not only a
# crash of redis-server. Redis batches the fsync per event-loop turn (about 0.2 ms here); see
# docs/resilience.md. (WAITAOF, which would sync only the job's writes, needs Redis 7.2; Debian 12 has 7.0.)
APPENDFSYNC = "always"


def redis_conf(plan: RedisPlan, data: Path) -> str:
    """A redis.conf for our own redis-server: append-only (fsync per write), data in ``data``, no TCP unless set."""
    lines = [
        "# Written by the gridstor launcher at every start; edit gridstor.yaml instead.",
        "daemonize no",
        f"dir {_q(str(data))}",
        "appendonly yes",
        f"appendfsync {APPENDFSYNC}",
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


def write_redis_conf(plan: RedisPlan, data: Path) -> Path:
    """Write ``data/redis.conf`` (0600: it may hold the password) and return its path."""
    data.mkdir(parents=True, exist_ok=True)
    conf = data / "redis.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(redis_conf(plan, data))
    return conf
