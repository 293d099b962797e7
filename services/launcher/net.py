"""The launcher's one network helper of its own: whether a port is free before anything starts.

Dialling (wildcard to loopback, ``host:port``), the health probe and the child
processes' environment are services/common/net.py's.
"""

from __future__ import annotations

import socket


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
