"""``python -m services.meta``: a bad config exits 2 with the message; a good one serves until SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gridstor.v1 import meta_pb2, meta_pb2_grpc
from services.common import net
from services.common.net import REPO_ROOT as ROOT
from tests.helpers import free_port_pair, wait_until_async


async def wait_serving(proc: subprocess.Popen[str], channel: grpc.aio.Channel, service: str) -> None:
    """Poll the health service until SERVING; fail with the process's stderr if it died."""
    health = health_pb2_grpc.HealthStub(channel)

    async def status() -> int | None:
        if proc.poll() is not None:
            raise AssertionError(
                f"the service exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            return int((await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)).status)
        except grpc.aio.AioRpcError:
            return None  # not listening yet

    serving = health_pb2.HealthCheckResponse.SERVING
    await wait_until_async(
        status, f"{service} to report SERVING", until=lambda s: s == serving, within=30, interval=0.1
    )


def run_meta(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.meta", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=net.child_env({"PATH": "/usr/bin:/bin"}),
    )


def test_bad_config_exits_2_with_the_message(tmp_path: Path) -> None:
    cfg = tmp_path / "gridstor.yaml"
    cfg.write_text("engine:\n  k: 0\n")
    proc = run_meta("--config", str(cfg), "--data", str(tmp_path / "data"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "config: engine.k: must be an integer >= 1" in err
    assert "Traceback" not in err


async def test_serves_until_sigterm(tmp_path: Path) -> None:
    metrics_offset = 100
    port = free_port_pair(metrics_offset)
    cfg = tmp_path / "gridstor.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"ports": {"meta": port}, "metrics_port_offset": metrics_offset, "engine": {"chunk_size": 65536}}
        )
    )
    proc = run_meta("--config", str(cfg), "--data", str(tmp_path / "data"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_serving(proc, channel, "gridstor.v1.MetaService")
            stub = meta_pb2_grpc.MetaServiceStub(channel)
            assert not (await stub.Exists(meta_pb2.ExistsRequest(id="a" * 56))).exists
        url = f"http://127.0.0.1:{port + metrics_offset}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
        assert "gridstor_meta_downloads_total" in body
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_port_in_use_exits_1(tmp_path: Path) -> None:
    """As services/common/service_main.py promises: a start that fails for a port in use is exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "gridstor.yaml"
        cfg.write_text(yaml.safe_dump({"ports": {"meta": port}, "engine": {"chunk_size": 65536}}))
        proc = run_meta("--config", str(cfg), "--data", str(tmp_path / "data"))
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert f"meta: cannot start: cannot listen on 127.0.0.1:{port} (port in use?)" in err
    assert "Traceback" not in err
