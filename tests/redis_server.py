"""A real redis-server (Debian's) for tests: unix socket in a temp dir, append-only on.

``watch_commands(url)`` shows what the server runs (MONITOR), so a test can wait until a client's
request has reached Redis instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tests.helpers import stop_process, wait_until

SKIP_REASON = "redis-server not installed (make test installs Debian's redis-server)"


class RedisProcess:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip(SKIP_REASON)
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.root),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.pings, f"redis-server to answer PING on {self.socket}", within=10, interval=0.02)

    def pings(self) -> bool:
        """Whether the server answers PING; fails at once if its process has ended."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {self.proc.returncode} on start")
        try:
            with redis.Redis(unix_socket_path=str(self.socket)) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@contextlib.asynccontextmanager
async def watch_commands(url: str) -> AsyncIterator[list[str]]:
    """The commands the server at ``url`` runs while the block lasts, as they arrive ("HGETALL key", ...)."""
    client = aioredis.Redis.from_url(url)
    seen: list[str] = []
    try:
        async with client.monitor() as monitor:

            async def read() -> None:
                async for info in monitor.listen():
                    seen.append(info["command"])

            reader = asyncio.create_task(read())
            try:
                yield seen
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    finally:
        await client.aclose()
