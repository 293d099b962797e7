"""The gateway key on disk, and the auth process itself: start, log, stop, refuse to start."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import yaml

from gridstor.v1 import auth_pb2, auth_pb2_grpc
from services.auth.service import build
from services.common import tokens
from services.common.config import build_config
from services.common.errors import InvalidInput
from services.common.keys import SIGNING_KEY_FILE
from services.common.net import REPO_ROOT as ROOT
from tests.auth.conftest import SECRET, AuthServer
from tests.helpers import child_env, free_port_pair
from tests.redis_server import RedisProcess

Start = Callable[..., Awaitable[AuthServer]]


async def test_key_file_is_0600_and_stable_across_restarts(start_auth: Start, data_dir: Path) -> None:
    first = await start_auth(mode="public")
    key_file = data_dir / SIGNING_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    before = await first.stub.PublicKey(auth_pb2.PublicKeyRequest())
    token = (await first.stub.Authenticate(auth_pb2.AuthenticateRequest(identity="gina"))).token
    await first.stop()

    second = await start_auth(mode="public")
    after = await second.stub.PublicKey(auth_pb2.PublicKeyRequest())
    assert (after.public_key, after.key_id) == (before.public_key, before.key_id)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    from nacl.signing import VerifyKey

    assert tokens.verify(VerifyKey(after.public_key), token).subject == "gina"  # old tokens survive a restart


async def test_world_readable_key_refuses_to_start(start_auth: Start, data_dir: Path) -> None:
    await (await start_auth(mode="public")).stop()
    key_file = data_dir / SIGNING_KEY_FILE
    key_file.chmod(0o644)
    cfg = build_config({"data_dir": str(data_dir)})
    with pytest.raises(InvalidInput, match=r"readable by others .*chmod 600"):
        await build(cfg, port=0)


# -- the process ---------------------------------------------------------------------


async def _spawn(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.auth",
        "--config",
        str(config),
        cwd=ROOT,
        env=child_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_process_serves_logs_json_and_stops_on_sigterm(tmp_path: Path, redis_server: RedisProcess) -> None:
    port = free_port_pair(1)  # grpc and metrics (metrics_port_offset 1)
    config = tmp_path / "gridstor.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "gateway"),
                "mode": "secret",
                "secret": SECRET,
                "redis": redis_server.url,
                "ports": {"auth": port},
                "metrics_port_offset": 1,
            }
        )
    )
    proc = await _spawn(config)
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, f"auth exited early: {''.join(lines)}"
                lines.append(line)
                if json.loads(line)["msg"] == "auth listening":
                    break
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            reply = await stub.Authenticate(auth_pb2.AuthenticateRequest(secret=SECRET, identity="hank"))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Authenticate(auth_pb2.AuthenticateRequest(secret=SECRET + "-wrong"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port + 1)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        metrics = (await reader.read()).decode()
        writer.close()
        assert 'gridstor_auth_issued_total{mode="secret"} 1' in metrics
        assert 'gridstor_auth_refused_total{reason="wrong_secret"} 1' in metrics
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rest = (await proc.stderr.read()).decode()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines += rest.splitlines(keepends=True)
    records = [json.loads(line) for line in lines if line.strip()]  # every line is one JSON object
    assert {"ts", "level", "service", "msg"} <= set(records[0])
    assert all(r["service"] == "auth" for r in records)
    messages = [r["msg"] for r in records]
    assert "token issued" in messages
    assert "authentication refused" in messages
    assert "auth stopping" in messages
    issued = next(r for r in records if r["msg"] == "token issued")
    assert issued["identity"] == "hank"
    text = "".join(lines)
    assert SECRET not in text
    assert reply.token not in text
    key = (tmp_path / "gateway" / SIGNING_KEY_FILE).read_bytes()
    assert key.hex() not in text


async def test_process_refuses_world_readable_key(tmp_path: Path) -> None:
    data = tmp_path / "gateway"
    data.mkdir()
    key_file = data / SIGNING_KEY_FILE
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o644)
    config = tmp_path / "gridstor.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(data), "ports": {"auth": free_port_pair(1)}}))
    proc = await _spawn(config)
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 2
    assert f"key file {key_file} is readable by others" in text
    assert f"chmod 600 {key_file}" in text
    assert "Traceback" not in text


async def test_process_refuses_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "gridstor.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path), "mode": "open-to-all"}))
    proc = await _spawn(config)
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "config: mode: must be one of public, secret, allowlist" in err.decode()
    assert "Traceback" not in err.decode()


@pytest.mark.parametrize("mode", ["public", "secret"])
async def test_process_refuses_admins_where_identities_are_claimed(tmp_path: Path, mode: str) -> None:
    """In public and secret modes anyone may log in as 'ops': an admins list there would make anyone an admin."""
    config = tmp_path / "gridstor.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path), "mode": mode, "secret": SECRET, "admins": ["ops"]}))
    proc = await _spawn(config)
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert err.decode().strip() == (
        f"config: admins: mode {mode!r} does not prove identities (anyone may log in under any name), so listing"
        " admins would make anyone an admin: remove admins and use `gridstor admin token` on the gateway machine,"
        " or use mode 'allowlist', where identities are proven by their keys"
    )
