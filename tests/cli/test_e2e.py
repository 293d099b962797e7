"""The whole suite as a user runs it: the launcher as a subprocess on free ports, the CLI as subprocesses.

put/get/exists/stat/status with byte-identical results, ranges, --json, clear failures; SIGTERM stops every
process the launcher started; a second start on the same data dir serves the files stored before.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from services.common.net import REPO_ROOT as ROOT
from tests.cli.launcher_proc import Launcher, alive, children_of, write_config
from tests.helpers import child_env

pytestmark = pytest.mark.slow

ID = re.compile(r"^[0-9a-f]{56}(\.[a-z0-9.]+)?$")


class Cli:
    def __init__(self, config: Path, home: Path) -> None:
        self.config = config
        self.env = child_env()
        self.env["HOME"] = str(home)
        self.env["XDG_CONFIG_HOME"] = str(home / ".config")

    def __call__(self, *args: object) -> subprocess.CompletedProcess[bytes]:
        argv = [sys.executable, "-m", "services.cli", "--config", str(self.config), *map(str, args)]
        r = subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, timeout=120)
        err = r.stderr.decode()
        assert "Traceback" not in err, err
        assert "\r" not in err and "\x1b" not in err, "progress bar drawn into a pipe"
        return r

    def ok(self, *args: object) -> str:
        r = self(*args)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode().strip()

    def fails(self, *args: object) -> str:
        """The one-line message of a command that must exit 1."""
        r = self(*args)
        err = r.stderr.decode()
        assert r.returncode == 1, (r.returncode, err)
        assert err.startswith("gridstor: ") and err.count("\n") == 1, err
        return err


def test_put_get_stop_restart(tmp_path: Path, launched: list[Launcher]) -> None:
    data = tmp_path / "data"
    config = write_config(data)
    config_text = config.read_text()
    first = Launcher(data)
    launched.append(first)
    first.wait_up()
    banner = first.stdout
    for word in (str(config), "auth", "meta", "ingest", "/metrics", "put README.md --wait", "get <id> -o copy"):
        assert word in banner, banner
    assert f"--config {config}" in banner  # custom ports: the example names the config

    # One launcher per data dir.
    second = subprocess.run(
        [sys.executable, "-m", "services.launcher", "--data", str(data)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 1
    assert f"another launcher (pid {first.proc.pid}) is already running on {data}" in second.stderr

    gs = Cli(config, tmp_path / "home")
    small = tmp_path / "hello.txt"
    small.write_bytes(b"hello gridstor\n")
    big = tmp_path / "big.bin"
    big_bytes = os.urandom(5 * 1024 * 1024 + 12345)
    big.write_bytes(big_bytes)

    # put --wait prints the file id (receipt verified); --json says so explicitly.
    small_id = gs.ok("put", small, "--wait")
    assert ID.match(small_id) and small_id.endswith(".txt"), small_id
    put = json.loads(gs.ok("--json", "put", big, "--wait"))
    big_id = put["file_id"]
    assert ID.match(big_id) and big_id.endswith(".bin")
    assert put["size"] == len(big_bytes) and put["receipt"]["verified"] is True
    assert put["hash"] == big_id[:48] and put["deduplicated"] is False
    again = json.loads(gs.ok("put", big, "--wait", "--json"))
    assert again["file_id"] == big_id and again["deduplicated"] is True

    # get: byte-identical, to a file (nothing else left in the folder) or to stdout.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    gs.ok("get", big_id, "-o", out_dir / "copy.bin")
    assert (out_dir / "copy.bin").read_bytes() == big_bytes
    assert os.listdir(out_dir) == ["copy.bin"]
    assert gs("get", small_id, "-o", "-").stdout == small.read_bytes()
    gs.ok("-q", "get", small_id, "-o", out_dir)  # into a folder: named by the id
    assert (out_dir / small_id).read_bytes() == small.read_bytes()

    # The same files over REST through the Envoy the launcher started: HTTPS with the local CA it made.
    rest = re.search(r"REST (https://\S+)/v1", banner)
    assert rest, banner
    base = rest.group(1)
    ca = data / "tls" / "ca.pem"
    assert f"CA {ca}" in banner and f"curl --cacert {ca} " in banner
    tls_ctx = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(f"{base}/v1/files/{big_id}", timeout=60, context=tls_ctx) as resp:
        assert resp.read() == big_bytes
    req = urllib.request.Request(f"{base}/v1/files?name=note.txt", data=b"via envoy\n", method="POST")
    with urllib.request.urlopen(req, timeout=60, context=tls_ctx) as resp:
        job = json.loads(resp.read())["job"]
    with urllib.request.urlopen(f"{base}/v1/jobs/{job}?wait=true", timeout=90, context=tls_ctx) as resp:
        status = json.loads(resp.read())
    assert status["state"] == "JOB_STATE_DONE", status
    with urllib.request.urlopen(f"{base}/v1/files/{status['file_id']}", timeout=60, context=tls_ctx) as resp:
        assert resp.read() == b"via envoy\n"

    # Ranges.
    size = len(big_bytes)
    for offset, length in [
        (0, 1),
        (1000, 4096),
        (4 * 1024 * 1024 - 7, 20),
        (size - 10, 0),
        (size - 10, 100),
        (size, 0),
    ]:
        r = gs("get", big_id, "--offset", offset, "--length", length, "-o", "-")
        assert r.returncode == 0, r.stderr
        end = size if length == 0 else offset + length
        assert r.stdout == big_bytes[offset:end], (offset, length)
    assert "out of range" in gs.fails("get", big_id, "--offset", size + 1, "-o", out_dir / "x")

    # exists / stat, text and JSON.
    assert gs.ok("exists", big_id) == big_id
    assert gs.ok("exists", big_id[:56]) == big_id  # the canonical id carries the extension
    assert json.loads(gs.ok("--json", "exists", big_id)) == {"exists": True, "id": big_id}
    info = json.loads(gs.ok("stat", big_id, "--json"))
    assert info["id"] == big_id and info["size"] == size and info["hash"] == big_id[:48]
    assert info["ext"] == ".bin" and info["k"] == 16 and info["m"] == 4 and info["chunks"] >= 2
    assert "size:    15 bytes" in gs.ok("stat", small_id[:56])

    # Failures: one line, exit 1, and no file left behind.
    err = gs.fails("get", "not-a-file-id", "-o", out_dir / "bad")
    assert err.startswith("gridstor: invalid file id 'not-a-file-id'")
    unknown = "0" * 48 + "00000fff"
    err = gs.fails("get", unknown, "-o", out_dir / "missing")
    assert err.startswith("gridstor: not found: ") and unknown in err
    assert sorted(os.listdir(out_dir)) == sorted(["copy.bin", small_id])
    assert "not found" in gs.fails("exists", unknown)
    assert json.loads(gs("--json", "exists", unknown).stdout) == {"exists": False, "id": unknown}
    assert "not found" in gs.fails("stat", unknown)
    assert gs.fails("status", "0123456789abcdef0123456789abcdef").startswith("gridstor: not found: no job")
    assert gs.fails("status", "no-such-job").startswith("gridstor: invalid request: ")

    # put without --wait: the job id; status answers for it.
    other = tmp_path / "notes.md"
    other.write_bytes(b"# notes\n" * 1000)
    job = gs.ok("put", other, "--name", "renamed.MD")
    assert re.fullmatch(r"[0-9a-f]{32}", job), job
    other_id = gs.ok("status", job, "--wait", "--timeout", "60")
    assert ID.match(other_id) and other_id.endswith(".md")
    status = json.loads(gs.ok("--json", "status", job))
    assert status["state"] == "DONE" and status["file_id"] == other_id and status["size"] == 8000

    # SIGTERM stops everything the launcher started (services, their workers, redis).
    kids = children_of(first.proc.pid)
    assert len(kids) >= 4, kids  # redis + auth + meta + ingest (+ ingest's workers)
    assert first.terminate() == 0, first.stderr
    assert "stopped" in first.stderr
    assert not [pid for pid in kids if alive(pid)]
    assert not (data / "redis.sock").exists()

    # Started again on the same data dir: same config, the earlier files still download.
    restarted = Launcher(data)
    launched.append(restarted)
    restarted.wait_up()
    assert "written now" not in restarted.stdout
    assert config.read_text() == config_text
    gs.ok("get", big_id, "-o", out_dir / "after-restart.bin")
    assert (out_dir / "after-restart.bin").read_bytes() == big_bytes
    assert gs("get", other_id, "-o", "-").stdout == other.read_bytes()
    kids = children_of(restarted.proc.pid)
    assert restarted.terminate() == 0
    assert not [pid for pid in kids if alive(pid)]
