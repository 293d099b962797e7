"""One CLI run's connection state: addresses, channels, the token, and how results are printed."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc

from gridstor.v1 import auth_pb2_grpc, ingest_pb2_grpc, meta_pb2_grpc
from services.cli.connect import Endpoints, load_token, open_channel, resolve_endpoints, token_expiry, token_path
from services.cli.failures import CliFailure, is_tls_failure, rpc_failure
from services.common import tls

UNARY_TIMEOUT = 30.0  # seconds for a call that does not stream or wait


@dataclass
class Session:
    """What every command needs; ``close`` shuts the channels."""

    gateway: str | None = None
    config: str | None = None
    ca: str | None = None
    token_override: str | None = None
    json: bool = False
    quiet: bool = False
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    _endpoints: Endpoints | None = None
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)

    # addresses and stubs ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> Endpoints:
        if self._endpoints is None:
            self._endpoints = resolve_endpoints(self.gateway, self.config, ca=self.ca)
        return self._endpoints

    def address(self, service: str) -> str:
        return self.endpoints.of(service)

    def channel(self, service: str) -> grpc.Channel:
        address = self.address(service)
        ch = self._channels.get(address)
        if ch is None:
            ep = self.endpoints
            ch = self._channels[address] = open_channel(address, ep.tls, ep.ca)
        return ch

    def auth(self) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self.channel("auth"))

    def ingest(self) -> ingest_pb2_grpc.IngestServiceStub:
        return ingest_pb2_grpc.IngestServiceStub(self.channel("ingest"))

    def meta(self) -> meta_pb2_grpc.MetaServiceStub:
        return meta_pb2_grpc.MetaServiceStub(self.channel("meta"))

    @contextlib.contextmanager
    def rpc(self, service: str) -> Iterator[None]:
        """Turn a failed call to ``service`` into a one-line CliFailure."""
        try:
            yield
        except grpc.RpcError as err:
            raise self._tls_failure(err, service) or rpc_failure(err, service, self.address(service)) from None

    def _tls_failure(self, err: grpc.RpcError, service: str) -> CliFailure | None:
        """A message naming the certificate problem when a connection failed over TLS (or TLS was needed)."""
        if not isinstance(err, grpc.Call) or err.code() is not grpc.StatusCode.UNAVAILABLE:
            return None
        address = self.address(service)
        host, _, port = address.rpartition(":")
        ep = self.endpoints
        if ep.tls and is_tls_failure(err.details() or ""):
            reason = tls.diagnose(host, int(port), ep.ca) or (err.details() or "TLS handshake failed")
            trust = f"the CA {ep.ca}" if ep.ca is not None else "the system's CAs; give its CA with --ca FILE"
            return CliFailure(f"TLS with the gateway at {address} failed: {reason} (checked against {trust})")
        if not ep.tls and "socket closed" in (err.details() or "").lower() and tls.speaks_tls(host, int(port)):
            return CliFailure(
                f"the {service} service at {address} speaks TLS: use --gateway https://{address}, or a --config"
                " whose tls section says so (and --ca FILE for its CA)"
            )
        return None

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    # credentials -------------------------------------------------------------------------------------

    def token(self) -> str:
        """``--token``, else ``$GRIDSTOR_TOKEN``, else the saved token ("" when there is none)."""
        if self.token_override:
            return self.token_override
        return os.environ.get("GRIDSTOR_TOKEN") or load_token(token_path())

    def auth_metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata with the token; a saved token that has expired is left out, with a remark."""
        token = self.token()
        if token and not self.token_override and not os.environ.get("GRIDSTOR_TOKEN"):
            expires = token_expiry(token)
            if expires is not None and expires <= time.time():
                self.note(f"gridstor: the saved token expired at {time.ctime(expires)}; run `gridstor login`")
                token = ""
        return (("authorization", f"Bearer {token}"),) if token else ()

    # output ----------------------------------------------------------------------------------------------

    def result(self, text: str, data: dict[str, Any]) -> None:
        """The command's answer on stdout: ``text``, or ``data`` as one JSON line with --json."""
        line = json.dumps(data, sort_keys=True) if self.json else text
        self.stdout.write(line + "\n")
        self.stdout.flush()

    def note(self, text: str) -> None:
        """A remark for a human on stderr (never with --quiet; stdout stays clean for scripts)."""
        if not self.quiet:
            self.stderr.write(text + "\n")
            self.stderr.flush()
