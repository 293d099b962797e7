"""Watching a server's real gRPC health service in tests."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthWatch:
    """A Health.Watch stream of one service at a port; ``until`` waits for a status."""

    def __init__(self, port: int, service: str = "") -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.call = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(service=service))
        self.seen: list[int] = []

    async def until(self, status: int, within: float = 30.0) -> None:
        """Read the stream until ``status`` arrives; fail the test after ``within`` seconds."""
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        try:
            async with asyncio.timeout(within):
                async for reply in self.call:
                    self.seen.append(reply.status)
                    if reply.status == status:
                        return
        except TimeoutError:
            raise AssertionError(f"health did not turn {name} within {within}s (saw {self.seen})") from None
        raise AssertionError(f"the health stream ended before {name} (saw {self.seen})")

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close(None)
