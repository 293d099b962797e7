"""Helpers for the limits tests: uploads held open from a test thread, lease counts, tokens."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import grpc
import redis
from google.api import httpbody_pb2

from gridstor.v1 import ingest_pb2, ingest_pb2_grpc
from tests.gateway import Gateway
from tests.helpers import login_token


def token(gw: Gateway, identity: str) -> str:
    return login_token(gw.cfg, identity)


def bearer(tok: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {tok}"),)


def piece(data: bytes, name: str = "") -> ingest_pb2.UploadRequest:
    return ingest_pb2.UploadRequest(name=name, body=httpbody_pb2.HttpBody(data=data))


class HeldUpload:
    """An Upload whose stream stays open until ``finish`` (or is abandoned by the client going quiet)."""

    def __init__(self, stub: ingest_pb2_grpc.IngestServiceStub, metadata: Any, name: str = "held.bin") -> None:
        self.q: queue.Queue[ingest_pb2.UploadRequest | None] = queue.Queue()
        self.future = stub.Upload.future(self._messages(), metadata=metadata, timeout=60)
        self.q.put(piece(b"x" * 1000, name))

    def _messages(self) -> Iterator[ingest_pb2.UploadRequest]:
        while (msg := self.q.get()) is not None:
            yield msg

    def finish(self) -> ingest_pb2.UploadReply:
        self.q.put(piece(b"y" * 1000))
        self.q.put(None)
        return self.future.result(60)

    def error(self) -> grpc.RpcError:
        """The error the call ended with (the stream is released afterwards)."""
        try:
            reply = self.future.result(60)
        except grpc.RpcError as exc:
            return exc
        finally:
            self.q.put(None)
        raise AssertionError(f"the upload succeeded: {reply}")


def leases(gw: Gateway, kind: str, who: str) -> int:
    """Running uploads Redis counts for ``kind`` (id or addr) ``who``."""
    url = gw.cfg.redis_url.removeprefix("unix://")
    with redis.Redis(unix_socket_path=url) as client:
        return int(client.zcard(f"gridstor:limit:uploads:{kind}:{who}"))


def trailer(err: grpc.RpcError, key: str) -> str:
    assert isinstance(err, grpc.Call)
    return next((str(v) for k, v in err.trailing_metadata() or () if k == key), "")
