"""The maint service: tokens, start-up errors, and the background schedules."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from nacl.signing import SigningKey

from gridstor.v1 import maint_pb2, maint_pb2_grpc
from services.common.metaclient import MetaClient
from services.maint import service as maint_service
from services.maint import tasks as maint_tasks
from services.maint.__main__ import main
from services.maint.scrub import Scrubber, ScrubState
from tests.helpers import bearer, login_token, wait_until_async
from tests.maint.conftest import Gateway, gateway_config

Make = Callable[..., Awaitable[Gateway]]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test"


async def test_a_token_is_needed_unless_public(tmp_path: Path, gateways: Make) -> None:
    gw = await gateways(gateway_config(tmp_path / "gw", mode="secret", secret="s" * 20))
    assert gw.maint is not None
    file_id = await gw.store(b"data")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.maint.Check(maint_pb2.CheckRequest(id=file_id))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    user = login_token(gw.cfg, "alice")
    reply = await gw.maint.Check(maint_pb2.CheckRequest(id=file_id), metadata=(("authorization", f"Bearer {user}"),))
    assert reply.ok


async def test_admin_methods_need_an_operator_token_even_in_public_mode(tmp_path: Path, gateways: Make) -> None:
    gw = await gateways(gateway_config(tmp_path / "gw"))  # public mode
    maint = gw.maint
    assert maint is not None
    file_id = await gw.store(b"data")
    assert (await maint.Check(maint_pb2.CheckRequest(id=file_id))).ok  # read-only: open in public mode
    user = bearer(login_token(gw.cfg, "alice"))
    calls: dict[str, Callable[[Any], Awaitable[Any]]] = {
        "Repair": lambda md: maint.Repair(maint_pb2.RepairRequest(id=file_id), metadata=md),
        "Scrub": lambda md: maint.Scrub(maint_pb2.ScrubRequest(dry_run=True), metadata=md),
        "Backup": lambda md: maint.Backup(maint_pb2.BackupRequest(), metadata=md),
        "Restore": lambda md: maint.Restore(maint_pb2.RestoreRequest(force=True), metadata=md),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(user)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert "gridstor admin token" in (info.value.details() or "")
    assert (await gw.admin.Repair(maint_pb2.RepairRequest(id=file_id))).ok
    # In allowlist mode, where identities are proven by their keys, an identity the config lists as an
    # admin may use its ordinary login token; another allowlisted identity may not.
    keys = {name: SigningKey.generate().verify_key.encode().hex() for name in ("alice", "bob")}
    gw2 = await gateways(gateway_config(tmp_path / "gw2", mode="allowlist", allowlist=keys, admins=["alice"]))
    assert gw2.maint is not None
    file2 = await gw2.store(b"more")
    repair = maint_pb2.RepairRequest(id=file2)
    assert (await gw2.maint.Repair(repair, metadata=bearer(login_token(gw2.cfg, "alice")))).ok
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw2.maint.Repair(repair, metadata=bearer(login_token(gw2.cfg, "bob")))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "or log in as an identity listed in the config's admins" in (info.value.details() or "")


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("maint:\n  hard_every: 0\n")
    assert main(["--config", str(bad)]) == 2
    assert "maint.hard_every" in capsys.readouterr().err
    bad.write_text("maint:\n  scrub_everything: yes\n")
    assert main(["--config", str(bad)]) == 2
    assert "unknown setting(s) scrub_everything" in capsys.readouterr().err
    assert main(["restore", "--record", str(tmp_path / "none.record"), "--data", str(tmp_path / "d")]) == 1
    assert "cannot read the backup record" in capsys.readouterr().err


async def test_scheduled_passes_alternate_soft_and_hard(tmp_path: Path, gateways: Make) -> None:
    cfg = gateway_config(tmp_path / "gw", maint={"scrub_interval": 0.05, "hard_every": 2})
    gw = await gateways(cfg, maint=False)
    await gw.store(os.urandom(1000))
    client = MetaClient.for_config(dataclasses.replace(cfg, ports={**cfg.ports, "meta": gw.meta_port}), "maint")
    state = tmp_path / "scrub.json"
    scrubber = Scrubber(gw.engine, client, cfg.maint, state_path=state)
    task = asyncio.create_task(scrubber.run_schedule())
    try:

        async def two_passes() -> bool:
            s = ScrubState.load(state)
            return s.last_hard_pass > 0 and s.passes_since_hard >= 1

        await wait_until_async(two_passes, "a hard pass and a soft pass after it")
    finally:
        task.cancel()
        await scrubber.close()
        await client.close()
    again = Scrubber(gw.engine, client, cfg.maint, state_path=state)  # the cycle survives a restart
    assert again.state.last_hard_pass == ScrubState.load(state).last_hard_pass > 0
    assert again.status().last_full_pass > 0


async def test_backup_and_cleanup_schedules(tmp_path: Path, gateways: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maint_tasks, "FIRST_BACKUP_DELAY", 0.0)
    data = tmp_path / "gw"
    cfg = gateway_config(data, maint={"scrub_interval": 0, "backup_interval": 3600, "cleanup_interval": 0.05})
    (data / "ssh").mkdir(parents=True)
    doc = {"version": 1, "accounts": {"alice": {"public_key": KEY, "max_bytes": 6000}}}  # one 4 KiB block of two
    (data / "ssh" / "accounts.json").write_text(json.dumps(doc))
    home = data / "homes" / "alice"
    home.mkdir(parents=True)
    (home / "old").write_bytes(b"o" * 80)
    os.utime(home / "old", (1000, 1000))
    (home / "new").write_bytes(b"n" * 80)

    gw = await gateways(cfg, maint=False)
    await gw.store(b"something")
    mcfg = dataclasses.replace(cfg, ports={**cfg.ports, "meta": gw.meta_port})
    running, cleanup = await maint_service.build(mcfg, port=0)
    try:

        async def backed_up() -> bool:
            return any((data / "backups").glob("*.record"))

        async def cleaned() -> bool:
            return not (home / "old").exists()

        await wait_until_async(backed_up, "the first scheduled backup")
        await wait_until_async(cleaned, "the home cleanup")
        assert (home / "new").exists()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        stub = maint_pb2_grpc.MaintServiceStub(channel)
        st = await stub.ScrubStatus(maint_pb2.ScrubStatusRequest())
        assert st.progress.state == maint_pb2.SCRUB_STATE_IDLE and st.progress.started == 0
        await channel.close(None)
    finally:
        await cleanup()
