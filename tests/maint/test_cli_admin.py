"""``gridstor check`` and ``gridstor admin ...`` against real meta + maint servers."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.helpers import wait_until_async
from tests.maint.conftest import CHUNK, Gateway, delete_shard, gateway_config, gridstor

Make = Callable[..., Awaitable[Gateway]]
pytestmark = pytest.mark.usefixtures("private_home")  # the user's real token and config are never touched


async def test_check_repair_scrub_replicas_backup_restore(tmp_path: Path, gateways: Make) -> None:
    gw = await gateways(gateway_config(tmp_path / "gw"))
    file_id = await gw.store(os.urandom(CHUNK * 2 + 1))

    code, out, _ = await gridstor(gw, tmp_path, "check", file_id)
    assert code == 0 and out.startswith(f"ok: {file_id} (soft check, 3 chunks, k=16 m=4)")
    await delete_shard(gw.engine, await gw.record(file_id), 1, 6)
    code, out, _ = await gridstor(gw, tmp_path, "check", file_id, "--hard")
    assert code == 1 and out.startswith("DAMAGED") and "chunk 1: missing [6]\n" in out
    assert "lost: 1 shards" in out and "unreachable now: 0 shards" in out
    assert "content hash matches the id" in out
    code, out, _ = await gridstor(gw, tmp_path, "check", "bad-id")
    assert code == 1 and out == ""

    # A backend that does not answer now is reported apart from lost shards: the file is readable.
    record = await gw.record(file_id)
    away = record.backends[record.chunks[0].shards[2].backend]
    folder = gw.cfg.data_dir / "backends" / away
    os.rename(folder, folder.with_name(away + "-away"))
    try:
        code, out, _ = await gridstor(gw, tmp_path, "check", file_id)
    finally:
        os.rename(folder.with_name(away + "-away"), folder)
    assert code == 1 and out.startswith("DAMAGED"), out  # chunk 1 lost shard 6 as well
    assert "lost: 1 shards" in out and "unreachable now: 3 shards" in out
    assert f"unreachable backends: {away}\n" in out and "chunk 0: unreachable [2]" in out
    assert "repairable: run `gridstor admin repair ID`" in out
    # Back, it answers again once its circuit breaker's probe finds it (a second or so).
    await wait_until_async(
        lambda: gw.check(file_id), f"{away} to answer again", until=lambda c: not c.unreachable_backends
    )

    code, _, err = await gridstor(gw, tmp_path, "admin", "repair", file_id)
    assert code == 1 and "gridstor admin token" in err  # operators only, even in public mode
    code, _, err = await gridstor(gw, tmp_path, "admin", "token", "--data", str(tmp_path / "nowhere"))
    assert code == 1 and "no gateway key" in err
    code, out, _ = await gridstor(gw, tmp_path, "admin", "token", "--data", str(gw.cfg.data_dir))
    assert code == 0 and "admin token valid until" in out
    code, out, _ = await gridstor(gw, tmp_path, "admin", "repair", file_id, "--json")
    assert code == 0
    assert json.loads(out)["shards_repaired"] == 1 and json.loads(out)["repaired"][0]["shards"] == [6]

    code, out, _ = await gridstor(gw, tmp_path, "admin", "scrub", "--hard", "--wait")
    assert code == 0 and "scrub idle (hard pass" in out and "checked 1, damaged 0" in out
    code, out, _ = await gridstor(gw, tmp_path, "admin", "scrub", "--status", "--json")
    assert code == 0 and json.loads(out)["files_checked"] == 1

    code, out, _ = await gridstor(gw, tmp_path, "admin", "replicas")
    assert code == 0 and "in sync (this gateway: master)" in out and "no replicas configured" in out

    record_file = tmp_path / "keep" / "backup.record"
    code, out, _ = await gridstor(gw, tmp_path, "admin", "backup", "-o", str(record_file), "--json")
    assert code == 0 and json.loads(out)["records"] == 1 and record_file.exists()
    code, _, err = await gridstor(gw, tmp_path, "admin", "restore", "--record", str(record_file))
    assert code == 1 and "refused" in err and "needs an empty one" in err
    code, out, _ = await gridstor(gw, tmp_path, "admin", "restore", "--record", str(record_file), "--force")
    assert code == 0 and out.startswith("restored 1 records")
    code, _, err = await gridstor(gw, tmp_path, "admin", "restore")
    assert code == 2 and "--record FILE" in err


async def test_admin_compact_gives_back_the_space_of_deleted_shards(tmp_path: Path, gateways: Make) -> None:
    gw = await gateways(gateway_config(tmp_path / "gw"))
    kept = os.urandom(CHUNK * 3)
    file_id = await gw.store(kept)
    # A failed store attempt: its shards were written, then deleted (dead bytes in every backend).
    failed = await gw.engine.store([os.urandom(CHUNK * 8)])
    await gw.engine.delete_shards(failed)

    code, _, err = await gridstor(gw, tmp_path, "admin", "compact")
    assert code == 1 and "gridstor admin token" in err  # operators only
    await gridstor(gw, tmp_path, "admin", "token", "--data", str(gw.cfg.data_dir))
    code, out, err = await gridstor(gw, tmp_path, "admin", "compact", "--wait", "--json")
    assert code == 0, err
    reply = json.loads(out)
    assert reply["running"] is False and reply["skipped"] == 0
    shard_bytes = sum(b["freed_bytes"] for b in reply["backends"] if b["name"].startswith("b"))
    assert shard_bytes >= CHUNK * 8 and reply["freed_bytes"] >= shard_bytes
    assert all(b["dead_bytes"] == 0 and not b["error"] for b in reply["backends"])
    assert {b["name"] for b in reply["backends"]} >= {"b00", "b19", "metadata records", "metadata index"}
    assert gw.registry.counter("maint_compact_freed_bytes_total", "").value() == reply["freed_bytes"]
    assert await gw.fetch(file_id) == kept  # what is live is still there

    code, out, _ = await gridstor(gw, tmp_path, "admin", "compact", "--wait")
    assert code == 0 and out.startswith("compaction done (started ") and "0.0 MB freed, 0 segments removed" in out
    assert "  b00: 0.0 MB freed, 0 segments removed (0.0 MB moved), 0.0 MB dead left" in out
