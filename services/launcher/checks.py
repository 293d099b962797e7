"""What the launcher makes sure of before it starts anything: one launcher per data dir, free ports."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from services.common.config import Config
from services.launcher.errors import LaunchError
from services.launcher.net import port_free
from services.launcher.redis_server import RedisPlan

LOCK_NAME = "launcher.lock"


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
