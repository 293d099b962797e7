"""What a user sees when the gateway refuses an upload for its own reasons: one clear line, a proper exit code.

Real gateway services (tests/gateway.py), the CLI as a subprocess, a real full disk (a small tmpfs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from services.common.net import REPO_ROOT
from tests.gateway import run_gateway
from tests.helpers import child_env, tmpfs

MiB = 1024 * 1024


def gridstor(ingest_port: int, home: Path, *args: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
    env = child_env(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    argv = [sys.executable, "-m", "services.cli", "--gateway", f"127.0.0.1:{ingest_port}", *args]
    return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_full_spool_disk_is_named_not_called_too_large(tmp_path: Path, home: Path) -> None:
    spool = tmp_path / "gw" / "data" / "spool"
    with tmpfs(spool, "2m"), run_gateway(tmp_path / "gw", {"tls": {"edge": False}}, envoy=False) as gw:
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(4 * MiB))  # under max_upload (100 MB), over the 2 MiB disk
        proc = gridstor(gw.running["ingest"].port, home, "put", str(big))
        _, err = proc.communicate(timeout=120)
        text = err.decode()
        assert proc.returncode == 1, text
        assert text == "gridstor: gateway out of space: the gateway's spool disk is full; try again later\n"
        assert "too large" not in text
        assert gw.spool_files() == []  # the partial file went with the refusal


def test_put_from_stdin_exits_cleanly_when_the_server_fails_the_call(tmp_path: Path, home: Path) -> None:
    """The server refuses mid-stream while stdin stays open: the server's message and exit 1, no abort."""
    with run_gateway(tmp_path / "gw", {"tls": {"edge": False}, "max_upload": "1MiB"}, envoy=False) as gw:
        proc = gridstor(gw.running["ingest"].port, home, "put", "-", stdin=subprocess.PIPE)
        assert proc.stdin is not None
        # More than the limit, then nothing while stdin stays open: the CLI waits in a read of stdin
        # (its last message is not full) when the server fails the call.
        feed = threading.Thread(target=lambda: _feed(proc.stdin, MiB + 300 * 1024), daemon=True)
        feed.start()
        try:
            rc = proc.wait(timeout=120)
        finally:
            proc.stdin.close()
        err = proc.stderr.read().decode() if proc.stderr is not None else ""
        assert rc == 1, (rc, err)
        assert "Fatal Python error" not in err and "Traceback" not in err, err
        assert err.startswith("gridstor: too large: the upload is over the upload limit of 1048576 bytes"), err


def _feed(pipe: object, n: int) -> None:
    """Write ``n`` bytes to the CLI's stdin; a pipe the CLI closed by exiting ends it quietly."""
    try:
        pipe.write(os.urandom(n))  # type: ignore[attr-defined]
        pipe.flush()  # type: ignore[attr-defined]
    except (BrokenPipeError, ValueError):
        pass
