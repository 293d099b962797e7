"""Network and process-environment helpers of the launcher, kept together in one place.

The wildcard-to-loopback rule, ``host:port`` with IPv6 brackets, the gRPC health probe and the
PYTHONPATH of child processes are written here once for the launcher; they move to a shared
module in services/common when one exists.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]  # the repository: children run from here


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


def child_env() -> dict[str, str]:
    """The environment of a child process: ours, with the repository and its protos on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "protos"), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env
