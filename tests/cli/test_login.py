"""``gridstor keygen`` / ``login`` against real auth servers (port 0, real redis-server for replay checks)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from services.auth.service import build
from services.cli import main
from services.cli.connect import load_signing_key
from services.common.config import build_config
from services.common.keys import signing_key
from services.common.server import Running
from services.common.tokens import verify
from tests.redis_server import RedisProcess

SECRET = "a-shared-secret-of-some-length"


async def cli(*argv: str) -> tuple[int, str, str]:
    """Run the CLI in a thread: its calls are blocking, the server shares this event loop."""
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
async def start_auth(
    redis_server: RedisProcess, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[tuple[Running, Path]]]]:
    started: list[tuple[Running, Callable[[], Awaitable[None]]]] = []

    async def start(**settings: Any) -> tuple[Running, Path]:
        data = tmp_path / "gateway"
        cfg = build_config({"redis": redis_server.url, "data_dir": str(data), **settings})
        running, cleanup = await build(cfg, port=0)
        started.append((running, cleanup))
        return running, data

    yield start
    for running, cleanup in started:
        await running.server.stop(None)
        await cleanup()


async def test_allowlist_login_saves_a_token_for_the_identity(
    start_auth: Callable[..., Awaitable[tuple[Running, Path]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "alice.key"
    code, out, _ = await cli("keygen", "--out", str(key_file))
    assert code == 0
    running, data = await start_auth(mode="allowlist", allowlist={"alice": out.strip()})
    token_file = tmp_path / "tokens" / "t"
    monkeypatch.setenv("GRIDSTOR_TOKEN_FILE", str(token_file))
    gw = f"127.0.0.1:{running.port}"

    code, out, err = await cli("--gateway", gw, "--json", "login", "--identity", "alice", "--key", str(key_file))
    assert (code, err) == (0, "")
    reply = json.loads(out)
    assert reply["identity"] == "alice" and reply["token_file"] == str(token_file)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    claims = verify(signing_key(data).verify_key, token_file.read_text().strip())
    assert "alice" in claims.subject and claims.expires_at == reply["expires_at"]

    # A key the allowlist does not hold is refused with the server's reason, exit 1.
    other = tmp_path / "mallory.key"
    assert (await cli("-q", "keygen", "--out", str(other)))[0] == 0
    code, out, err = await cli("--gateway", gw, "login", "--identity", "alice", "--key", str(other))
    assert code == 1 and out == ""
    assert err.startswith("gridstor: not authenticated: ") and err.endswith("(run `gridstor login`)\n")
    assert load_signing_key(other)  # untouched


async def test_secret_login_from_env_or_file(
    start_auth: Callable[..., Awaitable[tuple[Running, Path]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, data = await start_auth(mode="secret", secret=SECRET)
    gw = f"127.0.0.1:{running.port}"
    monkeypatch.setenv("GRIDSTOR_TOKEN_FILE", str(tmp_path / "t"))
    monkeypatch.setenv("MY_SECRET", SECRET)
    code, out, err = await cli("--gateway", gw, "login", "--secret-env", "MY_SECRET")
    assert code == 0, err
    assert "logged in" in out and SECRET not in out + err
    verify(signing_key(data).verify_key, (tmp_path / "t").read_text().strip())

    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")  # the trailing newline of `echo` is not part of the secret
    os.remove(tmp_path / "t")
    assert (await cli("--gateway", gw, "login", "--secret-file", str(secret_file)))[0] == 0
    assert (tmp_path / "t").exists()

    secret_file.write_text("wrong-secret-wrong-secret\n")
    code, _, err = await cli("--gateway", gw, "login", "--secret-file", str(secret_file))
    assert code == 1 and "not authenticated" in err and "wrong-secret" not in err
