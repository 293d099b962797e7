"""The real launcher as a subprocess for tests: free ports, its output, its process tree."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import yaml

from services.common.net import REPO_ROOT as ROOT
from tests.helpers import child_env, port_is_free, wait_until

SERVICES = ("auth", "ingest", "meta", "ssh", "maint")
METRICS_OFFSET = 5


def free_ports() -> dict[str, int]:
    """Ports for every service (port and port + METRICS_OFFSET free), then Envoy and SSH (12 in a row)."""
    for _ in range(200):
        base = random.randrange(20000, 60000)
        if all(port_is_free(base + i) for i in range(2 * METRICS_OFFSET + 2)):
            ports = {svc: base + i for i, svc in enumerate(SERVICES)}
            ports["envoy"] = base + 2 * METRICS_OFFSET
            ports["sshd"] = base + 2 * METRICS_OFFSET + 1
            return ports
    raise RuntimeError("no 12 free ports in a row found")


def write_config(data: Path, **extra: object) -> Path:
    """A minimal gateway config with free ports in ``data``/gridstor.yaml (what the launcher reads by default)."""
    data.mkdir(parents=True, exist_ok=True)
    ports = free_ports()
    edge, sshd = ports.pop("envoy"), ports.pop("sshd")
    cfg = {
        "ports": ports,
        "envoy_port": edge,
        "ssh": {"port": sshd},
        "metrics_port_offset": METRICS_OFFSET,
        "workers": 1,
        **extra,
    }
    path = data / "gridstor.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def children_of(pid: int) -> set[int]:
    """Every live (non-zombie) descendant of ``pid``."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Launcher:
    """``python -m services.launcher --data DIR`` with its stdout and stderr collected."""

    def __init__(self, data: Path, *args: str) -> None:
        self.data = data
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.launcher", "--data", str(data), *args],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.up = threading.Event()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream: object, into: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line)
            if line.startswith("gridstor is up."):
                self.up.set()

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def output(self) -> str:
        return f"{self.stdout}\n{self.stderr}"

    def _up(self) -> bool:
        if self.proc.poll() is not None and not self.up.is_set():
            raise AssertionError(f"the launcher exited with {self.proc.returncode}:\n{self.output()}")
        return self.up.is_set()

    def wait_up(self, timeout: float = 90) -> None:
        """Wait for its "gridstor is up." line; fail with its output if it exits or takes longer."""
        try:
            wait_until(self._up, "its 'gridstor is up.' line", within=timeout, interval=0.1, detail=self.output)
        except AssertionError:
            self.kill()
            raise

    def wait(self, timeout: float = 60) -> int:
        """Wait for it to exit, and for its output to be read to the end."""
        rc = self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(timeout)  # EOF once every process that holds the pipes has gone
        return rc

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
