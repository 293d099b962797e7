"""Fixtures for the auth service: real auth servers on port 0 over a real redis-server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from nacl.signing import SigningKey

from gridstor.v1 import auth_pb2, auth_pb2_grpc
from services.auth.service import build
from services.common.config import Config, build_config
from services.common.metrics import Registry
from services.common.server import Running
from tests.redis_server import RedisProcess

SECRET = "correct-horse-battery-staple-42"


def sign(key: SigningKey, identity: str, epoch: int) -> bytes:
    """A client's allowlist signature, written from the contract in auth.proto (not the server's helper)."""
    return key.sign(f"gridstor/v1/auth\n{identity}\n{epoch}".encode()).signature


def now() -> int:
    return int(time.time())


@dataclass
class AuthServer:
    cfg: Config
    running: Running
    cleanup: Callable[[], Awaitable[None]]
    channel: grpc.aio.Channel
    stub: auth_pb2_grpc.AuthServiceAsyncStub
    registry: Registry
    stopped: bool = False

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.channel.close(None)
        await self.running.server.stop(None)
        await self.cleanup()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "gateway"


@pytest.fixture
async def start_auth(redis_server: RedisProcess, data_dir: Path) -> AsyncIterator[Callable[..., Awaitable[AuthServer]]]:
    """``await start_auth(mode=..., **settings)``: an auth server on port 0; every one stopped afterwards."""
    started: list[AuthServer] = []

    async def start(**settings: Any) -> AuthServer:
        raw = {"redis": redis_server.url, "data_dir": str(data_dir), **settings}
        cfg = build_config(raw)
        registry = Registry()
        running, cleanup = await build(cfg, port=0, registry=registry)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        server = AuthServer(cfg, running, cleanup, channel, auth_pb2_grpc.AuthServiceStub(channel), registry)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
def alice() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def bob() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def allowlist(alice: SigningKey, bob: SigningKey) -> dict[str, str]:
    return {"alice": alice.verify_key.encode().hex(), "bob": bob.verify_key.encode().hex()}


def auth_request(key: SigningKey, identity: str, epoch: int | None = None) -> auth_pb2.AuthenticateRequest:
    """A correctly signed allowlist request for ``identity`` at ``epoch`` (default: now)."""
    epoch = now() if epoch is None else epoch
    return auth_pb2.AuthenticateRequest(identity=identity, epoch=epoch, signature=sign(key, identity, epoch))
