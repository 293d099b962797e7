"""Network plumbing every process shares: dialling a service, gRPC channels, the health check, child processes.

* A server listening on a wildcard address (0.0.0.0, ::) is dialled on this
  machine's loopback (``dial_host``), which is also a name its certificate carries.
* ``channel`` / ``aio_channel``: plain, or TLS verified against a CA given as
  PEM bytes (None: the system's CAs), with room for 8 MiB messages.
* ``health_status`` asks the standard gRPC health service of a server.
* ``child_env``: the environment for a child Python process that imports the
  services from this checkout (the repository root and its generated protos).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
MAX_MESSAGE = 8 * 1024 * 1024

Options = Sequence[tuple[str, Any]]


def dial_host(host: str) -> str:
    """Where to connect to a server listening on ``host`` (a wildcard address means this machine)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


def hostport(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 literal."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dial(address: str) -> str:
    """``address`` (``host:port``) as a client dials it: a wildcard host becomes loopback."""
    host, _, port = address.rpartition(":")
    return hostport(dial_host(host), int(port))


def _options(extra: Options) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        *extra,
    ]


def _credentials(ca: bytes | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca)


def channel(address: str, *, tls: bool = False, ca: bytes | None = None, options: Options = ()) -> grpc.Channel:
    """A blocking channel to ``address``: plain, or TLS trusting ``ca`` (None: the system's CAs)."""
    if not tls:
        return grpc.insecure_channel(address, options=_options(options))
    return grpc.secure_channel(address, _credentials(ca), options=_options(options))


def aio_channel(address: str, *, tls: bool = False, ca: bytes | None = None, options: Options = ()) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: plain, or TLS trusting ``ca`` (None: the system's CAs)."""
    if not tls:
        return grpc.aio.insecure_channel(address, options=_options(options))
    return grpc.aio.secure_channel(address, _credentials(ca), options=_options(options))


def health_status(
    address: str, *, service: str = "", timeout: float = 3.0, tls: bool = False, ca: bytes | None = None
) -> tuple[int | None, str]:
    """The health of ``service`` ("" = the whole server) at ``address``: (status, a line saying so).

    The status is a ``HealthCheckResponse.ServingStatus`` value, or None when the
    server did not answer (the line then gives grpc's code and message).
    """
    with channel(address, tls=tls, ca=ca) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
            details = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
            return None, f"{address}: {code} {details}".strip()
    return int(reply.status), f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with PYTHONPATH leading to this checkout first."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), str(REPO_ROOT / "protos"), env.get("PYTHONPATH", "")) if p
    )
    return env
