"""services.edge.provision: the 0-db namespaces a config names, created with their modes and passwords."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.backends import Mode, open_backend
from services.common.config import build_config
from services.edge.provision import ADMIN_ENV, main, namespaces
from tests.zdb_server import ZdbProcess


def zdb_config(tmp_path: Path, host: str, port: int) -> dict[str, Any]:
    return {
        "data_dir": str(tmp_path / "data"),
        "engine": {"k": 2, "m": 1},
        "backends": [f"zdb://:shardpw@{host}:{port}/s{i}" for i in range(3)],
        "metadata": {
            "uri": f"zdb://{host}:{port}/meta",
            "index_uri": f"zdb://{host}:{port}/meta-index",
            "replicas": [f"zdb://{host}:{port}/meta-replica"],
        },
    }


def test_namespaces_and_modes(tmp_path: Path) -> None:
    cfg = build_config(zdb_config(tmp_path, "zdb-1", 9900))
    found = {(ns.uri.namespace, ns.mode, ns.uri.password) for ns in namespaces(cfg)}
    assert found == {
        ("s0", Mode.SEQ, "shardpw"),
        ("s1", Mode.SEQ, "shardpw"),
        ("s2", Mode.SEQ, "shardpw"),
        ("meta", Mode.SEQ, None),
        ("meta-index", Mode.USER, None),
        ("meta-replica", Mode.USER, None),
    }
    replica = build_config(
        {
            **zdb_config(tmp_path, "zdb-1", 9900),
            "role": "replica",
            "metadata": {"uri": "zdb://zdb-2:9900/meta-replica", "mode": "user", "master": "zdb://zdb-1:9900/meta"},
        }
    )
    assert {(ns.uri.namespace, ns.mode) for ns in namespaces(replica) if ns.uri.namespace.startswith("meta")} == {
        ("meta-replica", Mode.USER)
    }
    assert namespaces(build_config({"data_dir": str(tmp_path)})) == []  # dir backends only


def test_unreachable_zdb_is_a_clear_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(zdb_config(tmp_path, "127.0.0.1", 1)))
    assert main(["--config", str(path), "--wait", "0"]) == 1
    assert "127.0.0.1:1" in capsys.readouterr().err


async def test_provision_creates_namespaces(
    tmp_path: Path, zdb_factory: Callable[..., ZdbProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    zdb = zdb_factory(admin="admin-pw")
    raw = zdb_config(tmp_path, zdb.host, zdb.port)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv(ADMIN_ENV, "admin-pw")
    assert await asyncio.to_thread(main, ["--config", str(path)]) == 0
    assert await asyncio.to_thread(main, ["--config", str(path)]) == 0  # idempotent
    seq = await open_backend(raw["backends"][0], Mode.SEQ)
    await seq.close()
    index = await open_backend(raw["metadata"]["index_uri"], Mode.USER)
    await index.close()
