"""Health probes for containers: ``python -m services.edge.probe grpc HOST:PORT [--ca FILE]`` or ``http URL``.

Exit 0 when healthy, 1 otherwise (with the reason on stderr); compose health checks run these.
With ``--ca`` the gRPC probe speaks TLS and verifies the service's certificate against that CA.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

from grpc_health.v1 import health_pb2

from services.common import net


def grpc_ok(address: str, service: str = "", timeout: float = 3.0, ca: str | None = None) -> tuple[bool, str]:
    """Whether the gRPC health service at ``address`` reports ``service`` ("" = the server) SERVING."""
    roots = None
    if ca is not None:
        try:
            roots = Path(ca).read_bytes()
        except OSError as exc:
            return False, f"cannot read the CA file {ca}: {exc.strerror}"
    status, why = net.health_status(address, service=service, timeout=timeout, tls=ca is not None, ca=roots)
    return status == health_pb2.HealthCheckResponse.SERVING, why


def http_ok(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Whether ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200, f"{url}: {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.edge.probe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("grpc", help="gRPC health check")
    g.add_argument("address", help="HOST:PORT")
    g.add_argument("--service", default="", help="service name (default: the whole server)")
    g.add_argument("--ca", metavar="FILE", help="speak TLS, verifying the server against this CA certificate")
    h = sub.add_parser("http", help="HTTP GET answering 200")
    h.add_argument("url")
    args = parser.parse_args(argv)
    ok, why = grpc_ok(args.address, args.service, ca=args.ca) if args.kind == "grpc" else http_ok(args.url)
    print(why, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
