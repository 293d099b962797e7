"""Fixtures for the auth service: real auth servers on port 0 over a real redis-server."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from gridstor.v1 import auth_pb2, auth_pb2_grpc
from services.auth.service import build
from services.common.config import build_config
from tests.helpers import Served
from tests.redis_server import RedisProcess

SECRET = "correct-horse-battery-staple-42"


def sign(key: SigningKey, identity: str, epoch: int) -> bytes:
    """A client's allowlist signature, written from the contract in auth.proto (not the server's helper)."""
    return key.sign(f"gridstor/v1/auth\n{identity}\n{epoch}".encode()).signature


def now() -> int:
    return int(time.time())


class AuthServer(Served):
    """An auth server under test (tests.helpers.Served) and its stub."""

    @functools.cached_property
    def stub(self) -> auth_pb2_grpc.AuthServiceAsyncStub:
        return auth_pb2_grpc.AuthServiceStub(self.channel)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "gateway"


@pytest.fixture
async def start_auth(redis_server: RedisProcess, data_dir: Path) -> AsyncIterator[Callable[..., Awaitable[AuthServer]]]:
    """``await start_auth(mode=..., **settings)``: an auth server on port 0; every one stopped afterwards."""
    started: list[AuthServer] = []

    async def start(**settings: Any) -> AuthServer:
        raw = {"redis": redis_server.url, "data_dir": str(data_dir), **settings}
        server = await AuthServer.start(build, build_config(raw))
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
