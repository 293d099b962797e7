"""A client in another language: tests/node/client.js (@grpc/grpc-js + @grpc/proto-loader) against real meta + ingest.

The servers run in this process (tests/ingest/conftest.py's suite_factory: meta, ingest with a worker
process, a real redis-server); the Node script runs as a subprocess and loads the repo's .proto files
with googleapis-common-protos' include dir, as a third-party client would.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import blake3
import google.api.httpbody_pb2
import pytest

from gridstor.v1 import meta_pb2
from services.common.ids import HASH_HEX, META_HEX
from services.common.net import REPO_ROOT as ROOT

# Reused fixture: meta + ingest + redis in-process.
from tests.helpers import Result, run_program
from tests.ingest.conftest import Suite, SuiteFactory, suite_factory  # noqa: F401

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "client.js"
NODE = shutil.which("node")
# The folder holding google/api/*.proto (googleapis-common-protos ships them beside its modules).
GOOGLEAPIS_DIR = Path(google.api.httpbody_pb2.__file__).resolve().parents[2]
CLIENT_TIMEOUT = 60.0

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (Debian: apt-get install nodejs npm)"),
    pytest.mark.skipif(
        not (HERE / "node_modules").is_dir(),
        reason="tests/node/node_modules is missing: run `npm ci --prefix tests/node` (make test does when node exists)",
    ),
]


class Run(Result):
    """client.js's result: its last stdout line is the JSON reply, its last stderr line the JSON error."""

    @property
    def json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.out.strip().splitlines()[-1])
        return result

    @property
    def error(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.err.strip().splitlines()[-1])["error"]
        return result


def ingest_address(suite: Suite) -> str:
    """Where the suite's ingest server listens (the fixture starts it on port 0)."""
    return f"127.0.0.1:{suite.ingest_port}"


async def run_client(suite: Suite, *args: str) -> Run:
    """Run client.js against the suite without blocking the event loop the servers run on."""
    argv = [
        str(NODE),
        str(CLIENT),
        *args,
        "--ingest",
        ingest_address(suite),
        "--meta",
        f"127.0.0.1:{suite.cfg.ports['meta']}",
        "--include",
        str(ROOT / "protos"),
        "--include",
        str(GOOGLEAPIS_DIR),
    ]
    if suite.cfg.internal_tls:
        argv += ["--ca", str(suite.cfg.tls_path(suite.cfg.tls.ca))]
    done = await run_program(*argv, cwd=HERE, limit=CLIENT_TIMEOUT)
    return Run(done.rc, done.out, done.err)


async def test_round_trip_through_node(suite_factory: SuiteFactory, tmp_path: Path) -> None:  # noqa: F811
    suite = await suite_factory()
    data = os.urandom(1024 * 1024)
    src, out = tmp_path / "random.bin", tmp_path / "copy.bin"
    src.write_bytes(data)

    run = await run_client(suite, "put", str(src), str(out))

    assert run.rc == 0, run.err
    assert out.read_bytes() == data
    file_id = run.json["id"]
    digest = blake3.blake3(data).digest(24).hex()
    stat = await suite.meta.Stat(meta_pb2.StatRequest(id=file_id))
    assert file_id == f"{digest}{stat.info.meta_id:0{META_HEX}x}.bin"
    assert len(file_id.split(".")[0]) == HASH_HEX + META_HEX
    assert run.json["size"] == len(data) == run.json["downloaded"]
    assert run.json["hash"] == digest


async def test_malformed_id_is_invalid_argument(suite_factory: SuiteFactory, tmp_path: Path) -> None:  # noqa: F811
    suite = await suite_factory()
    out = tmp_path / "never.bin"

    run = await run_client(suite, "get", "not-a-file-id", str(out))

    assert run.rc != 0
    assert run.error["name"] == "INVALID_ARGUMENT", run.err
    assert "file id" in run.error["details"]
