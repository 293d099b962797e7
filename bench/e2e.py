"""End-to-end benchmark of the running gateway against a bare gRPC stream over loopback.

In one run it measures:
  (a) a 100 MiB upload through IngestService.Upload in 256 KiB messages, timed from
      the first byte sent until Status(wait=true) answers DONE (each run new content);
  (b) its download through MetaService.Download (1 MiB messages), checked byte for
      byte and against the id's BLAKE3-192 after the clock stops;
  (c) the ceiling: a bare grpc.aio server in a child process of this one (a trivial
      servicer on a free loopback port that counts an upload stream of the same
      messages and streams 1 MiB messages of the same total back), so the ratios
      upload / bare upload and download / bare download print;
  (d) with the folders of 4 backends moved away (put back afterwards): the download of a
      file holding data shards there (read degraded, from parity), alternating with that
      of another file of the same size holding only parity there (read healthy: it needs
      none of them), as a ratio of the two; with the backends away for the whole block
      (the gateway rightly skips them then), only alternating files lets drift on a
      shared machine hit both alike;
  (e) the peak RSS (VmHWM) of every process under the launcher: the services,
      ingest's worker processes, redis-server and Envoy (after each phase, and at the end);
  (f) 20 concurrent 10 MiB uploads, each on its own channel with its own content:
      how many succeed, the total MB/s and the slowest;
  (g) the time to first byte of a 1 MiB HTTP Range at the end of a 1 GiB file
      (``--range-gib``), through Envoy's REST edge, against a 1 MiB Range at its start:
      a read near the end touches only the chunks it needs, so both take about as long.
  (h) load: 100 concurrent downloads of one file, then 100 concurrent uploads (each on
      its own channel, each its own content), with p50 / p99 latency, errors, and the peak
      RSS of every process under the launcher during each, against the 300 MiB target
      (and the RSS once the load is over: memory handed back). ``--load 0`` skips it.
  (i) with a 0-db binary (ZDB_BIN, or zdb on PATH) and a suite of its own: one of the 20
      backends is a 0-db namespace; the download of a file holding data shards on it is
      timed healthy, then with that 0-db stopped (SIGSTOP: it accepts connections and never
      answers), as a ratio (target: within 1.5x of healthy). The first download after the
      stop, which opens the backend's circuit breaker, is shown apart.
  (j) ``--backend zdb``: the suite runs on 0-db, from ZDB_BIN like the tests: 20 sequential
      namespaces on 5 zdb servers x 4 (bench/zdbfarm.py), the metadata records and hash index
      on a sixth; (a)-(h) print as above for it ((d) SIGKILLs the zdb server whose 4
      namespaces all hold data shards of the file, and starts it again afterwards: a node
      gone; (i) is left out). After (a), a dir:// suite starts beside it, and ``--runs``
      uploads and downloads alternate between the two suites (then the dir suite stops,
      and (b)-(h) follow on the 0-db suite); the medians give
      ``zdb/dir upload ratio`` and ``zdb/dir download ratio`` (target >= 0.8x each).
      Without a zdb binary it exits (2) naming ZDB_BIN.

Each of (a)-(d) runs ``--runs`` times (default 9), bare and gateway runs alternating so
drift hits both (in (d) the degraded and healthy files alternate); the verdicts use the medians.
Beside each figure it prints the CPU seconds each process spent (/proc/<pid>/stat): the
suite's processes, this client, the bare server, kernel threads and anything else running
on the machine, which shows where the time goes (and when someone else's work disturbs it).
After (a) it prints what writing into new page-cache pages costs on this machine, against
writing over pages already there, and how much an upload writes to the page cache (its
spool file and its shards; the bare stream writes none): on a virtual machine whose host
takes free memory back, each new page is faulted in by the host and costs far more than
the copy.

By default it starts its own suite (``python -m services.launcher``) on a temp data
dir with free ports, from the launcher's default config (20 dir backends, workers
one per core, TLS and limits as their defaults are) with only the ports and, when
the upload would not fit, ``max_upload`` changed. ``--attach CONFIG`` measures a
suite that is already running (the launcher's lock file in its data dir names the
launcher, whose processes are measured). The services' own ports are used; when
the config turns TLS on for them, the CA it names is trusted, and the bare server
serves the same certificate so both sides pay for TLS alike.

Targets are ratios to the bare stream in the same run (absolute MB/s swing on a
shared machine). The exit code is 0 when every step ran, whether or not a target
is met (this is a measurement), and 1 when something failed: an upload or
download error, a byte mismatch. MB = 10^6 bytes.

    .venv/bin/python bench/e2e.py                   # 100 MiB, well under a minute on 2 cores
    .venv/bin/python bench/e2e.py --size-mib 20     # a quicker look (--range-gib 0: no 1 GiB file for (g))
    .venv/bin/python bench/e2e.py --attach data/gridstor.yaml
    .venv/bin/python bench/e2e.py --profile /tmp/prof   # + py-spy raw profiles of the services
    ZDB_BIN=/path/to/zdb .venv/bin/python bench/e2e.py --backend zdb   # (j): on 0-db, and zdb/dir
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

import blake3  # noqa: E402
import grpc  # noqa: E402
import yaml  # noqa: E402
from google.api import httpbody_pb2  # noqa: E402
from zdbfarm import MISSING as ZDB_MISSING  # noqa: E402
from zdbfarm import ZDB_MALLOC_ENV, ZdbFarm, zdb_available  # noqa: E402

from gridstor.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, meta_pb2, meta_pb2_grpc  # noqa: E402
from services.common import net, tls  # noqa: E402
from services.common.backends.uri import DirURI, parse_uri  # noqa: E402
from services.common.config import SERVICES, Config, load_config  # noqa: E402
from services.launcher.children import dying_with_parent  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
UPLOAD_MESSAGE = 256 * 1024
DOWNLOAD_MESSAGE = 1024 * 1024
HASH_BYTES = 24
DEGRADED_BACKENDS = 4
UPLOAD_TARGET = 0.5  # x bare upload
DOWNLOAD_TARGET = 0.9  # x bare download
DEGRADED_TARGET = 0.9  # x healthy download
HUNG_TARGET = 0.67  # x healthy download with one backend hung: within 1.5x of healthy (1/1.5, rounded up)
HUNG_BACKEND = "b19"  # the default config's backend that becomes a 0-db namespace for (i)
RSS_TARGET_MIB = 300.0
RANGE_TTFB_TARGET = 3.0  # x a range at the start of the same file (a read that scanned from the start: 100x+)
STATUS_WAIT = 60  # seconds per Status(wait=true) call; repeated while the job is ACTIVE
JOB_DEADLINE = 600.0  # seconds an upload job may take before the run calls it failed
START_TIMEOUT = 180.0  # seconds the launcher may take to print its banner
BANNER_END = "stop with Ctrl-C."
AWAY_SUFFIX = ".bench-away"


class BenchFailure(Exception):
    """Something the benchmark needs failed (not a missed target)."""


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


def verdict(ok: bool) -> str:
    return "ok" if ok else "BELOW TARGET"


# ----------------------------------------------------------------------------- channels


def open_channel(address: str, ca: bytes | None) -> grpc.aio.Channel:
    """A plain channel, or TLS trusting ``ca``; its own connection, even to an address dialled already."""
    return net.aio_channel(address, tls=ca is not None, ca=ca, options=[("grpc.use_local_subchannel_pool", 1)])


# ----------------------------------------------------------------------------- the bare server (child)


BareContext = grpc.aio.ServicerContext[Any, Any]


async def bare_upload_handler(
    request_iterator: AsyncIterator[ingest_pb2.UploadRequest], context: BareContext
) -> ingest_pb2.UploadReply:
    """Count the bytes of an upload stream."""
    n = 0
    async for msg in request_iterator:
        n += len(msg.body.data)
    return ingest_pb2.UploadReply(job="bare", size=n)


BLOCK = os.urandom(DOWNLOAD_MESSAGE)


async def bare_download_handler(
    request: meta_pb2.DownloadRequest, context: BareContext
) -> AsyncIterator[httpbody_pb2.HttpBody]:
    """Stream ``request.length`` bytes back in 1 MiB messages."""
    left = request.length
    first = True
    while left > 0:
        n = min(left, DOWNLOAD_MESSAGE)
        data = BLOCK if n == DOWNLOAD_MESSAGE else BLOCK[:n]
        if first:
            yield httpbody_pb2.HttpBody(content_type="application/octet-stream", data=data)
            first = False
        else:
            yield httpbody_pb2.HttpBody(data=data)
        left -= n


def bare_handlers() -> list[grpc.GenericRpcHandler[Any, Any]]:
    """IngestService.Upload and MetaService.Download only, with the real messages (and nothing else)."""
    upload = grpc.stream_unary_rpc_method_handler(
        bare_upload_handler,
        request_deserializer=ingest_pb2.UploadRequest.FromString,
        response_serializer=ingest_pb2.UploadReply.SerializeToString,
    )
    download = grpc.unary_stream_rpc_method_handler(
        bare_download_handler,
        request_deserializer=meta_pb2.DownloadRequest.FromString,
        response_serializer=httpbody_pb2.HttpBody.SerializeToString,
    )
    return [
        grpc.method_handlers_generic_handler("gridstor.v1.IngestService", {"Upload": upload}),
        grpc.method_handlers_generic_handler("gridstor.v1.MetaService", {"Download": download}),
    ]


async def serve_bare(config: str | None) -> None:
    """Serve BareIngest and BareMeta on a free loopback port; print it; stop when stdin closes."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", net.MAX_MESSAGE),
            ("grpc.max_send_message_length", net.MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers(bare_handlers())
    if config:  # the same certificate as the services, so both sides pay for TLS alike
        key, chain = tls.server_pair(load_config(config))
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, chain)]))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    # The parent holds our stdin open while it lives: EOF means stop (also when it dies).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


@dataclass
class BareServer:
    proc: subprocess.Popen[str]
    address: str
    ca: bytes | None

    @classmethod
    def start(cls, cfg: Config, config_path: Path) -> BareServer:
        argv = [sys.executable, __file__, "--bare-server"]
        ca = None
        if cfg.internal_tls:
            argv += ["--bare-tls", str(config_path)]
            ca = tls.ca_bytes(cfg)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            proc.kill()
            raise BenchFailure(f"the bare gRPC server did not start (it printed {line!r})")
        return cls(proc, f"127.0.0.1:{line}", ca)

    def stop(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------------- the suite


def free_port(taken: set[int], offset: int = 0) -> int:
    """A free loopback port (and ``port + offset`` free too, for a service's metrics) not in ``taken``."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        wanted = {port, port + offset}
        if wanted & taken or port + offset > 65535:
            continue
        if offset:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + offset))
                except OSError:
                    continue
        taken |= wanted
        return port
    raise BenchFailure("no free loopback ports")


def write_config(
    data_dir: Path, size: int, tweak: Callable[[dict[str, Any]], None] | None = None
) -> tuple[Path, list[str]]:
    """DIR/gridstor.yaml: the launcher's default config with free ports, room for the upload, then ``tweak``."""
    from services.common.config_text import default_yaml
    from services.launcher import CONFIG_NAME

    data_dir.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(default_yaml(data_dir))
    offset = int(raw.get("metrics_port_offset", 100))
    taken: set[int] = set()
    raw["ports"] = {svc: free_port(taken, offset) for svc in SERVICES}
    raw["envoy_port"] = free_port(taken)
    raw["ssh"]["port"] = free_port(taken)
    notes = []
    if int(raw.get("max_upload", 0)) < size:
        notes.append(f"max_upload raised from {raw.get('max_upload')} to {size} bytes for the upload")
        raw["max_upload"] = size
    if tweak is not None:
        tweak(raw)
    path = data_dir / CONFIG_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# Written by bench/e2e.py: the launcher's default config with free ports.\n")
        yaml.safe_dump(raw, f, sort_keys=False)
    return path, notes


class Suite:
    """A launcher this run started (``proc``), or one it attached to (``pid`` from the lock file)."""

    def __init__(self, cfg: Config, config_path: Path, launcher_pid: int, proc: subprocess.Popen[str] | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.launcher_pid = launcher_pid
        self.proc = proc
        self.output: list[str] = []
        self.hung: ZdbFarm | None = None  # (i): the 0-db backend this run stops
        self.farm: ZdbFarm | None = None  # --backend zdb: the 0-db servers holding every backend and the metadata

    @classmethod
    def start(
        cls, data_dir: Path, size: int, tweak: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[Suite, list[str]]:
        config_path, notes = write_config(data_dir, size, tweak)
        # The launcher gets SIGTERM (and stops the suite) if this benchmark dies.
        argv, hook = dying_with_parent(
            [sys.executable, "-m", "services.launcher", "--data", str(data_dir)], threads=threading.active_count() > 1
        )
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # Ctrl-C on the benchmark reaches the launcher only through stop()
            preexec_fn=hook,
        )
        try:
            return cls._wait_up(proc, config_path, data_dir), notes
        except BaseException:
            cls(load_config(config_path, data_dir=data_dir), config_path, proc.pid, proc).stop()
            raise

    @classmethod
    def _wait_up(cls, proc: subprocess.Popen[str], config_path: Path, data_dir: Path) -> Suite:
        lines: list[str] = []
        up = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.strip() == BANNER_END:
                    up.set()
            up.set()

        threading.Thread(target=pump, daemon=True).start()
        suite = cls(load_config(config_path, data_dir=data_dir), config_path, proc.pid, proc)
        suite.output = lines
        if not up.wait(START_TIMEOUT) or proc.poll() is not None:
            tail = "\n".join("    " + line for line in lines[-25:])
            raise BenchFailure(f"the launcher did not come up; its output:\n{tail}")
        # The config the launcher wrote / used, read back as the services read it.
        suite.cfg = load_config(config_path, data_dir=data_dir)
        return suite

    @classmethod
    def attach(cls, config: str) -> Suite:
        cfg = load_config(config)
        lock = cfg.data_dir / "launcher.lock"
        try:
            pid = int(json.loads(lock.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            raise BenchFailure(f"no running launcher found: {lock} names none (is the suite up?)") from None
        if not Path(f"/proc/{pid}").exists():
            raise BenchFailure(f"the launcher (pid {pid}, from {lock}) is not running")
        return cls(cfg, Path(config).absolute(), pid, None)

    def stop(self) -> None:
        """Stop the launcher this run started, then the 0-db servers it used."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for farm in (self.hung, self.farm):
            if farm is not None:
                farm.stop()

    @contextlib.contextmanager
    def away(self, names: list[str]) -> Iterator[str]:
        """Take the named backends away for the block and bring them back after it; yields how.

        dir:// backends: their folders are renamed (a disk gone). --backend zdb: the names are the
        namespaces of one zdb server (``ZdbFarm.names_on``), which is SIGKILLed (a node gone: its
        port refuses connections) and started again on the same data and port afterwards.
        """
        if self.farm is None:
            moved = move_away(self.cfg, names)
            try:
                yield "folders moved away"
            finally:
                put_back(moved)
            return
        farm = self.farm
        p = next((p for p in range(len(farm.servers)) if farm.names_on(p) == names), None)
        if p is None:
            raise BenchFailure(f"backends {', '.join(names)} are not the namespaces of one zdb server")
        server = farm.servers[p]
        server.kill()
        try:
            yield f"zdb server {p} (port {server.port}) SIGKILLed"
        finally:
            server.start()


# ----------------------------------------------------------------------------- processes and RSS


def _ppid_map() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # comm may hold spaces and parentheses: the fields after the last ')' are fixed.
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry)] = int(fields[1])
    return out


def descendants(root: int) -> list[int]:
    parents = _ppid_map()
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        kids = sorted(p for p, pp in parents.items() if pp == pid)
        found += kids
        todo += kids
    return found


def process_name(pid: int) -> str:
    """``meta``, ``ingest-worker``, ``redis``, ``envoy``... from the command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in argv if a]
    if "-m" in args:
        i = args.index("-m")
        if i + 1 < len(args):
            module = args[i + 1]
            if module == "services.ingest.worker":
                return "ingest-worker"
            return module.removeprefix("services.")
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        comm = ""
    # redis-server rewrites its command line into one string ("/usr/bin/redis-server unixsocket:...").
    first = args[0].split()[0] if args else ""
    base = os.path.basename(first) or comm or "?"
    if "redis-server" in (base, comm):
        return "redis"
    if "envoy" in (base, comm):
        return "envoy"
    return base


def status_kib(pid: int, field_name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Proc:
    name: str
    pid: int
    hwm_mib: float
    rss_mib: float


def suite_processes(launcher_pid: int) -> list[Proc]:
    """The launcher and everything under it, named, with VmHWM / VmRSS."""
    out = []
    counts: dict[str, int] = {}
    for pid in [launcher_pid, *descendants(launcher_pid)]:
        name = "launcher" if pid == launcher_pid else process_name(pid)
        hwm, rss = status_kib(pid, "VmHWM"), status_kib(pid, "VmRSS")
        if hwm is None or rss is None:
            continue  # gone, or a kernel thread
        counts[name] = counts.get(name, 0) + 1
        out.append(Proc(name, pid, hwm / 1024, rss / 1024))
    seen: dict[str, int] = {}
    for p in out:
        if counts[p.name] > 1:
            seen[p.name] = seen.get(p.name, 0) + 1
            p.name = f"{p.name}#{seen[p.name]}"
    return out


# ----------------------------------------------------------------------------- CPU accounting

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def _outside_name(pid: int) -> str:
    """How a process outside the suite is counted: ``[kworker]`` for kernel threads by kind, else ``(comm)``."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        kernel = not Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "(?)"
    if kernel:
        return f"[{comm.split('/')[0]}]"
    return f"({comm})"


class CpuMeter:
    """CPU seconds per step: each suite process by kind, the bench client, the bare server, and the rest.

    The rest: kernel threads by kind (``[kworker]`` writing dirty pages back), ``[irq]`` (busy time in
    /proc/stat that no process was charged with), and any other process on the machine by name
    (``(python)``): on a shared machine that is someone else's work, and the figures are disturbed.
    """

    def __init__(self, launcher_pid: int, extra: dict[str, int]) -> None:
        self.launcher_pid = launcher_pid
        self.extra = extra
        self.pids: dict[int, str] = {}
        self.refresh()
        self.steps: dict[str, dict[str, float]] = {}
        self.walls: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def refresh(self) -> None:
        """Look up the suite's processes again (a worker may have been restarted)."""
        self.pids = {p.pid: p.name.split("#")[0] for p in suite_processes(self.launcher_pid)}
        self.pids.update({pid: name for name, pid in self.extra.items()})

    def _snapshot(self) -> dict[int, float]:
        out = {0: machine_busy_seconds()}  # pid 0: the whole machine
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                t = cpu_seconds(int(entry))
                if t is not None:
                    out[int(entry)] = t
        return out

    async def run(self, step: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``fn`` once, adding the CPU each process spent and the wall time to ``step``."""
        before = self._snapshot()
        t0 = time.perf_counter()
        try:
            return await fn()
        finally:
            wall = time.perf_counter() - t0
            after = self._snapshot()
            acc = self.steps.setdefault(step, {})
            charged = 0.0
            for pid, t in after.items():
                if pid == 0 or pid not in before or t - before[pid] <= 0:
                    continue
                delta = t - before[pid]
                charged += delta
                name = self.pids.get(pid) or _outside_name(pid)
                acc[name] = acc.get(name, 0.0) + delta
            acc["[irq]"] = acc.get("[irq]", 0.0) + max(0.0, after[0] - before[0] - charged)
            self.walls[step] = self.walls.get(step, 0.0) + wall
            self.counts[step] = self.counts.get(step, 0) + 1

    def foreign(self) -> tuple[float, float, list[str]]:
        """CPU-s of processes outside the suite and this benchmark (not kernel threads), measured wall, names."""
        names: dict[str, float] = {}
        for acc in self.steps.values():
            for k, v in acc.items():
                if k.startswith("("):
                    names[k] = names.get(k, 0.0) + v
        top = [f"{k} {v:.1f} s" for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:3] if v >= 0.05]
        return sum(names.values()), sum(self.walls.values()), top

    def line(self, step: str) -> str:
        """``ingest-worker 0.31, bench 0.20, (kworker) 0.12 ... = 0.80 CPU-s in 0.45 s wall (1.8 cores busy)``."""
        n = self.counts.get(step, 0)
        if not n:
            return "(not measured)"
        per = {k: v / n for k, v in self.steps[step].items()}
        total = sum(per.values())
        wall = self.walls[step] / n
        shown = [(k, v) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.005]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in shown)
        return f"{parts} = {total:.2f} CPU-s in {wall:.2f} s wall ({total / wall:.1f} cores busy)"


# ----------------------------------------------------------------------------- profiling


class Profiler:
    """py-spy ``record -f raw`` of named suite processes while a step runs (``--profile DIR``)."""

    def __init__(self, out: Path | None, launcher_pid: int) -> None:
        self.out = out
        self.launcher_pid = launcher_pid
        beside = Path(sys.executable).with_name("py-spy")  # the dev venv's (requirements-dev.txt)
        self.binary = os.environ.get("PY_SPY") or shutil.which("py-spy") or (str(beside) if beside.exists() else "")
        if out is not None and not self.binary:
            raise BenchFailure("--profile needs py-spy: put it on PATH or name it in $PY_SPY")

    @contextlib.contextmanager
    def record(self, step: str, names: tuple[str, ...], seconds: int) -> Iterator[None]:
        if self.out is None:
            yield
            return
        self.out.mkdir(parents=True, exist_ok=True)
        procs = []
        for p in suite_processes(self.launcher_pid):
            if p.name.split("#")[0] in names:
                path = self.out / f"{step}-{p.name}-{p.pid}.txt"
                argv = [self.binary, "record", "-o", str(path), "-f", "raw", "--pid", str(p.pid)]
                argv += ["--duration", str(seconds), "--rate", "200", "--nonblocking"]
                procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)  # py-spy attaches before the step starts
        try:
            yield
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


# ----------------------------------------------------------------------------- client steps


def upload_requests(data: bytes, name: str) -> Iterator[ingest_pb2.UploadRequest]:
    """The upload stream: header fields in the first message, 256 KiB of bytes in each."""
    for off in range(0, max(len(data), 1), UPLOAD_MESSAGE):
        req = ingest_pb2.UploadRequest(body=httpbody_pb2.HttpBody(data=data[off : off + UPLOAD_MESSAGE]))
        if off == 0:
            req.name = name
            req.declared_size = len(data)
        yield req


async def send_upload(stub: Any, data: bytes, name: str, metadata: Any) -> ingest_pb2.UploadReply:
    call = stub.Upload(metadata=metadata)
    for req in upload_requests(data, name):
        await call.write(req)
    await call.done_writing()
    reply: ingest_pb2.UploadReply = await call
    return reply


async def wait_job(stub: Any, job: str) -> ingest_pb2.StatusReply:
    """Long-poll Status until the job ends; BenchFailure if it fails or takes too long."""
    deadline = time.monotonic() + JOB_DEADLINE
    while True:
        reply: ingest_pb2.StatusReply = await stub.Status(
            ingest_pb2.StatusRequest(job=job, wait=True, timeout_seconds=STATUS_WAIT)
        )
        if reply.state == common_pb2.JOB_STATE_DONE:
            return reply
        if reply.state == common_pb2.JOB_STATE_ERROR:
            raise BenchFailure(f"job {job} failed: {reply.error}")
        if time.monotonic() > deadline:
            raise BenchFailure(f"job {job} still {reply.result} after {JOB_DEADLINE:g} s")


@dataclass
class UploadResult:
    file_id: str
    received: float  # seconds from the first byte sent to the UploadReply
    done: float  # seconds from the first byte sent to DONE
    dedup: bool


async def timed_upload(ingest: Any, data: bytes, name: str, metadata: Any) -> UploadResult:
    t0 = time.perf_counter()
    reply = await send_upload(ingest, data, name, metadata)
    t1 = time.perf_counter()
    status = await wait_job(ingest, reply.job)
    t2 = time.perf_counter()
    if reply.size != len(data):
        raise BenchFailure(f"ingest received {reply.size} of {len(data)} bytes")
    return UploadResult(status.file_id, t1 - t0, t2 - t0, status.deduplicated)


async def timed_download(meta: Any, request: meta_pb2.DownloadRequest) -> tuple[list[bytes], float]:
    parts = []
    t0 = time.perf_counter()
    async for msg in meta.Download(request):
        parts.append(msg.data)
    return parts, time.perf_counter() - t0


async def checked_download(
    meter: CpuMeter, step: str, meta: Any, file_id: str, size: int, data: bytes | None = None, what: str = ""
) -> float:
    """MB/s of downloading ``file_id``, timed (and its CPU counted) as ``step``, then checked after the clock stopped.

    Byte for byte against ``data`` when this run kept the bytes, else size and BLAKE3-192 against the id.
    """
    request = meta_pb2.DownloadRequest(id=file_id)
    parts, dt = await meter.run(step, lambda: timed_download(meta, request))
    what = what or f"{step} download"
    if data is None:
        check_digest(parts, size, file_id, what)
    else:
        check_download(parts, data, file_id, what)
    return mbps(size, dt)


def check_download(parts: list[bytes], data: bytes, file_id: str, what: str) -> None:
    """Byte-for-byte and BLAKE3-192 against the id; BenchFailure on any difference."""
    check_digest(parts, len(data), file_id, what)
    if b"".join(parts) != data:
        raise BenchFailure(f"{what}: the bytes differ from those uploaded")


def check_digest(parts: list[bytes], size: int, file_id: str, what: str) -> None:
    """The size and BLAKE3-192 against the id (also for a file whose bytes this run did not keep)."""
    got = sum(len(p) for p in parts)
    if got != size:
        raise BenchFailure(f"{what}: {got} bytes arrived, {size} expected")
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for p in parts:
        h.update(p)
    digest = h.digest(HASH_BYTES).hex()
    if not file_id.startswith(digest):
        raise BenchFailure(f"{what}: BLAKE3-192 {digest} does not match the file id {file_id}")


def upload_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...] | None:
    """The bearer token of ``--token`` (or GRIDSTOR_TOKEN) as call metadata; None without one."""
    token = args.token or os.environ.get("GRIDSTOR_TOKEN", "")
    return (("authorization", f"Bearer {token}"),) if token else None


def page_cache_rates(directory: Path, size: int) -> tuple[float, float]:
    """MB/s of writing ``size`` bytes into a new file, then over the same bytes of it again.

    The first write needs page-cache pages the kernel allocates now, the second finds them
    there. On a virtual machine whose free memory goes back to its host (virtio-balloon free
    page reporting, as here), a page the kernel allocates is faulted in by the host at its
    first touch, and that dominates the first figure.
    """
    block = os.urandom(4 * MIB)
    path = directory / f"page-cache-probe-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        rates = []
        for _ in range(2):
            t0 = time.perf_counter()
            for off in range(0, size, len(block)):
                os.pwrite(fd, block, off)
            rates.append(mbps(size, time.perf_counter() - t0))
    finally:
        os.close(fd)
        path.unlink()
    return rates[0], rates[1]


def page_cache_text(cfg: Config, size: int) -> str:
    """The page-cache line of (a): what this machine charges for new pages, and what an upload writes.

    A stored upload goes into the page cache twice: its spool file (its size) and its k+m
    shards ((k+m)/k times its size); the bare stream writes none. The worker drops the spool
    file's pages as it reads them (``engine.read_once``), so those are reused, not new.
    """
    fresh, reused = page_cache_rates(cfg.spool_dir, size)
    k, m = cfg.engine.k, cfg.engine.m
    share = 1 + (k + m) / k
    return (
        f"writing {size // MIB} MiB into new pages {fresh:.0f} MB/s, over pages already there {reused:.0f} MB/s;"
        f" an upload writes {share:.2f}x its size (spool + {k}+{m} shards), the bare stream none"
    )


async def runs(n: int, fn: Callable[[], Awaitable[float]]) -> list[float]:
    return [await fn() for _ in range(n)]


def fmt_runs(values: list[float]) -> str:
    """``median 412.3 MB/s  best 501.0  (runs: 380 412 ...)``."""
    if len(values) == 1:
        return f"{values[0]:7.1f} MB/s"
    runs_text = " ".join(f"{v:.0f}" for v in values)
    return f"median {statistics.median(values):6.1f} MB/s  best {max(values):6.1f}  (runs: {runs_text})"


def ratio_text(num: list[float], den: list[float], of: str, target: float, report: Report, name: str) -> str:
    """The ratio of the medians against ``target`` (the verdict), and of the best runs for context."""
    ratio = statistics.median(num) / statistics.median(den)
    best = max(num) / max(den)
    return (
        f"{ratio:5.3f}x {of} (medians; best runs {best:.2f}x)   target >= {target}x   "
        f"{report.target(name, ratio >= target)}"
    )


# ----------------------------------------------------------------------------- the run


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    met: int = 0
    missed: list[str] = field(default_factory=list)
    rss_marks: list[tuple[str, dict[int, float]]] = field(default_factory=list)  # (phase, pid -> VmHWM MiB)
    notes: list[str] = field(default_factory=list)

    def mark_rss(self, phase: str, launcher_pid: int) -> None:
        self.rss_marks.append((phase, {p.pid: p.hwm_mib for p in suite_processes(launcher_pid)}))

    def target(self, name: str, ok: bool) -> str:
        if ok:
            self.met += 1
        else:
            self.missed.append(name)
        return verdict(ok)


@dataclass
class Placement:
    """Where one stored file keeps its shards: the backends holding data shards (how many each), and parity."""

    file_id: str
    data: Counter[str]
    parity: set[str]


async def placement(cfg: Config, meta: Any, file_id: str) -> Placement:
    """The file's placement, from its record (an internal method: the token is minted from the gateway key in the
    data dir, as the services' own are)."""
    from services.common.gateway import service_metadata

    reply = await meta.GetRecord(meta_pb2.GetRecordRequest(id=file_id), metadata=service_metadata(cfg, "bench"))
    rec = reply.record
    data: Counter[str] = Counter()
    parity: set[str] = set()
    for chunk in rec.chunks:
        for i, ref in enumerate(chunk.shards):
            name = rec.backends[ref.backend]
            if i < rec.k:
                data[name] += 1
            else:
                parity.add(name)
    return Placement(file_id, data, parity)


def degraded_pair(
    places: list[Placement], folders: set[str], count: int, groups: list[list[str]] | None = None
) -> tuple[int, int, list[str]]:
    """(file to read degraded, file to read healthy beside it, the backends to take away).

    The backends taken away hold data shards of the first file and only parity of the second, so with
    them away the first is read degraded while the second is read as fast as ever: the two alternate
    and whatever else the machine does hits both alike. With 20 backends and 16+4 a file keeps one
    placement for all its chunks, from a random first backend. The best pair found (most of the first
    file's data shards away); fewer than ``count`` backends when no pair allows more. ``groups``
    (--backend zdb): only one of these is taken away whole (the namespaces of one zdb server), and only
    when all of them hold data shards of the first file.
    """
    best: tuple[int, int, int, list[str]] = (-1, 0, 0, [])
    for a, pa in enumerate(places):
        for b, pb in enumerate(places):
            if a == b:
                continue
            if groups is None:
                ranked = [n for n, _ in pa.data.most_common() if n in folders]
                options = [[n for n in ranked if n in pb.parity and not pb.data[n]][:count]]
            else:
                options = [g for g in groups if all(pa.data[n] and n in pb.parity and not pb.data[n] for n in g)]
            for away in options:
                held = sum(pa.data[n] for n in away)
                if held > best[0]:
                    best = (held, a, b, away)
    return best[1], best[2], best[3]


@dataclass
class DegradedPair:
    degraded: str  # the file read with backends away
    healthy: str  # the file read beside it, needing none of them ("": none; the healthy runs of (b) compare)
    away: list[str]
    text: str


async def pick_degraded(
    suite: Suite, meta: Any, ingest: Any, metadata: Any, size: int, stored: list[str]
) -> DegradedPair | None:
    """The files and backends of (d) (``degraded_pair``); uploads more files (new content) until a pair allows
    DEGRADED_BACKENDS, up to 10. None without the gateway key (attached to a suite elsewhere).

    --backend zdb: the backends taken away are the namespaces of one zdb server (``Suite.away`` takes
    that server down).
    """
    from services.common.keys import SIGNING_KEY_FILE

    cfg = suite.cfg
    if not (cfg.data_dir / SIGNING_KEY_FILE).is_file():
        return None  # the files' placement is unknown (no gateway key to read their records)
    folders = {b.name for b in cfg.backends if isinstance(parse_uri(b.uri), DirURI)}  # (d) moves folders
    farm = suite.farm
    groups = None if farm is None else [farm.names_on(p) for p in range(len(farm.servers))]
    places = [await placement(cfg, meta, fid) for fid in dict.fromkeys(stored)]
    for i in range(11):
        a, b, away = degraded_pair(places, folders, DEGRADED_BACKENDS, groups)
        if len(away) == DEGRADED_BACKENDS or i == 10:
            break
        res = await timed_upload(ingest, os.urandom(size), f"bench-placement-{i}.bin", metadata)
        places.append(await placement(cfg, meta, res.file_id))
    if not away and farm is not None:  # no file's parity fills a zdb server: the healthy runs of (b) compare
        first = places[0]
        p = farm.server_holding_only(set(first.data))
        if p is None:
            raise BenchFailure("no zdb server holds only data shards of the file (its placement is not rotated)")
        away = farm.names_on(p)
        held, total = sum(first.data[n] for n in away), sum(first.data.values())
        text = f"{', '.join(away)} taken down (zdb server {p}), holding {held} of the file's {total} data shards"
        text += " (no stored file holds only parity there: the healthy runs of (b) compare)"
        return DegradedPair(first.file_id, "", away, text)
    if not away:
        raise BenchFailure("(d): no two stored files allow a degraded read beside a healthy one")
    pa = places[a]
    total = sum(pa.data.values())
    how = "taken down (their zdb server)" if farm is not None else "moved away"
    text = (
        f"{', '.join(away)} {how}, holding {sum(pa.data[n] for n in away)} of the degraded file's {total}"
        f" data shards and only parity of the healthy one"
    )
    return DegradedPair(pa.file_id, places[b].file_id, away, text)


def move_away(cfg: Config, names: list[str]) -> list[tuple[Path, Path]]:
    """Rename the folders of the named dir backends; the (from, to) pairs to put back."""
    specs = {b.name: b for b in cfg.backends}
    moved: list[tuple[Path, Path]] = []
    try:
        for name in names:
            if name not in specs:
                raise BenchFailure(f"backend {name} of the file's record is not in the config")
            parsed = parse_uri(specs[name].uri)
            if not isinstance(parsed, DirURI):
                raise BenchFailure(f"backend {name} is not a dir:// backend; cannot take it away here")
            src = Path(parsed.path)
            dst = src.with_name(src.name + AWAY_SUFFIX)
            os.rename(src, dst)
            moved.append((src, dst))
    except BaseException:
        put_back(moved)
        raise
    return moved


def put_back(moved: list[tuple[Path, Path]]) -> None:
    for src, dst in moved:
        os.rename(dst, src)


async def measure(args: argparse.Namespace, suite: Suite, report: Report) -> None:
    cfg = suite.cfg
    size = args.size_mib * MIB
    metadata = upload_metadata(args)
    if cfg.mode != "public" and metadata is None:
        raise BenchFailure(f"the gateway runs in {cfg.mode} mode: pass --token (or GRIDSTOR_TOKEN) for uploads")
    if cfg.max_upload < size:
        raise BenchFailure(
            f"max_upload of the config is {cfg.max_upload} bytes, less than {size}: use a smaller --size-mib"
            " or raise max_upload"
        )
    ca = tls.ca_bytes(cfg) if cfg.internal_tls else None
    profiler = Profiler(Path(args.profile) if args.profile else None, suite.launcher_pid)
    bare = BareServer.start(cfg, suite.config_path)
    channels: list[grpc.aio.Channel] = []
    try:
        bare_ch = open_channel(bare.address, bare.ca)
        ingest_ch = open_channel(net.dial(cfg.address("ingest")), ca)
        meta_ch = open_channel(net.dial(cfg.address("meta")), ca)
        channels += [bare_ch, ingest_ch, meta_ch]
        bare_ingest = ingest_pb2_grpc.IngestServiceStub(bare_ch)
        bare_meta = meta_pb2_grpc.MetaServiceStub(bare_ch)
        ingest = ingest_pb2_grpc.IngestServiceStub(ingest_ch)
        meta = meta_pb2_grpc.MetaServiceStub(meta_ch)
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 10)
        data = os.urandom(size)
        zdbs = suite.farm.pids() if suite.farm is not None else {}
        meter = CpuMeter(suite.launcher_pid, {"bench": os.getpid(), "bare-server": bare.proc.pid, **zdbs})

        # (a) upload through the pipeline, each run right after (c) the bare stream of the same bytes
        async def bare_upload() -> float:
            t0 = time.perf_counter()
            reply = await send_upload(bare_ingest, data, "bare.bin", None)
            dt = time.perf_counter() - t0
            if reply.size != size:
                raise BenchFailure(f"bare upload: {reply.size} of {size} bytes counted")
            return mbps(size, dt)

        print(
            f"\nupload {args.size_mib} MiB in {UPLOAD_MESSAGE // 1024} KiB messages, first byte -> job DONE"
            f" ({args.runs} runs, each new content, alternating with the bare stream)",
            flush=True,
        )
        bare_up: list[float] = []
        uploads: list[UploadResult] = []
        with profiler.record("upload", ("ingest", "ingest-worker"), 300):
            for i in range(args.runs):
                bare_up.append(await meter.run("bare upload", bare_upload))
                content = data if i == 0 else os.urandom(size)  # new content: no dedup

                def gateway_upload(content: bytes = content, i: int = i) -> Awaitable[UploadResult]:
                    return timed_upload(ingest, content, f"bench-{args.size_mib}mib-{i}.bin", metadata)

                uploads.append(await meter.run("upload", gateway_upload))
        file_id = uploads[0].file_id
        report.mark_rss("after uploads", suite.launcher_pid)
        gw_up = [mbps(size, u.done) for u in uploads]
        received = statistics.median(u.received for u in uploads)
        stored = statistics.median(u.done - u.received for u in uploads)
        print(f"  bare gRPC upload       : {fmt_runs(bare_up)}")
        print(f"  gateway upload         : {fmt_runs(gw_up)}")
        print(
            f"  of which (median)      : stream received {received:.2f} s ({mbps(size, received):.1f} MB/s),"
            f" then stored {stored:.2f} s ({mbps(size, stored):.1f} MB/s)"
        )
        print(f"  ratio                  : {ratio_text(gw_up, bare_up, 'bare', UPLOAD_TARGET, report, 'upload')}")
        print(f"  cpu s/run, bare        : {meter.line('bare upload')}")
        print(f"  cpu s/run, gateway     : {meter.line('upload')}")
        print(f"  page cache             : {page_cache_text(cfg, size)}")
        dedup = sum(u.dedup for u in uploads)
        fresh = f"  ({dedup} DEDUPLICATED, not fresh stores)" if dedup else ""
        print(f"  file id (run 1)        : {file_id}{fresh}")

        # (j) --backend zdb: against a dir:// suite, before (d) takes a zdb server down (its breakers
        # would make the next reads degraded ones for a while) and (f)-(h) load this suite only
        if suite.farm is not None:
            await compare_backends(args, suite, report)

        # (b) download healthy alternating with (c) the bare download, then (d) degraded

        async def bare_download() -> float:
            parts, dt = await timed_download(bare_meta, meta_pb2.DownloadRequest(id="bare", length=size))
            got = sum(len(p) for p in parts)
            if got != size:
                raise BenchFailure(f"bare download: {got} of {size} bytes")
            return mbps(size, dt)

        async def download(step: str, target: str = file_id) -> float:
            return await checked_download(meter, step, meta, target, size, data if target == file_id else None)

        pair = await pick_degraded(suite, meta, ingest, metadata, size, [u.file_id for u in uploads])
        print(
            f"\ndownload {args.size_mib} MiB in {DOWNLOAD_MESSAGE // MIB} MiB messages ({args.runs} runs of bare and"
            f" healthy, alternating; then {DEGRADED_BACKENDS} backends away: {args.runs} runs of a file read degraded"
            " and of one read healthy, alternating; each download verified after its clock stopped)",
            flush=True,
        )
        print(f"  degraded               : {pair.text if pair else 'skipped: no gateway key to read placements'}")
        bare_down: list[float] = []
        healthy: list[float] = []
        degraded: list[float] = []
        beside: list[float] = []
        with profiler.record("download", ("meta",), 300):
            for _ in range(args.runs):
                bare_down.append(await meter.run("bare download", bare_download))
                healthy.append(await download("healthy"))
        # The backends stay away for the whole block, as a lost disk would (a gateway rightly skips a
        # backend that just failed for a while). The healthy runs of the block read a file that holds
        # only parity there: they never need those backends.
        if pair is not None:
            with suite.away(pair.away), profiler.record("degraded", ("meta",), 300):
                for _ in range(args.runs):
                    degraded.append(await download("degraded", pair.degraded))
                    if pair.healthy:
                        beside.append(await download("healthy beside", pair.healthy))
        print(f"  bare gRPC download     : {fmt_runs(bare_down)}")
        print(f"  gateway download       : {fmt_runs(healthy)}")
        ratio = ratio_text(healthy, bare_down, "bare", DOWNLOAD_TARGET, report, "download")
        print(f"  ratio                  : {ratio}")
        print(f"  cpu s/run, bare        : {meter.line('bare download')}")
        print(f"  cpu s/run, gateway     : {meter.line('healthy')}")
        if degraded:
            print(f"  degraded download      : {fmt_runs(degraded)}")
            if beside:
                print(f"  healthy, same block    : {fmt_runs(beside)}")
            ratio = ratio_text(degraded, beside or healthy, "healthy", DEGRADED_TARGET, report, "degraded")
            print(f"  ratio                  : {ratio}")
            print(f"  cpu s/run, degraded    : {meter.line('degraded')}")
            if beside:
                print(f"  cpu s/run, healthy     : {meter.line('healthy beside')}")

        # (i) one backend hung (--backend zdb: every backend is 0-db, and (d) took a server down)
        if suite.hung is not None:
            await hung_downloads(args, suite, ingest, meta, metadata, data, file_id, meter, report)

        # (f) concurrent uploads
        report.mark_rss("after downloads", suite.launcher_pid)
        if suite.farm is not None:
            meter.extra.update(suite.farm.pids())  # (d) started a zdb server again: a new pid
        meter.refresh()
        await concurrent_uploads(args, cfg, ca, metadata, report, profiler, meter)
        busy, wall, top = meter.foreign()
        if busy >= 0.05 * wall:
            report.notes.append(
                f"other processes on this machine used {busy:.1f} CPU-s during the {wall:.1f} s of measured runs"
                f" ({', '.join(top)}): the figures are disturbed; run again on a quiet machine"
            )
        if args.range_gib:
            await range_ttfb(args, cfg, ingest, metadata, report)
        # (h) load
        if args.load:
            report.mark_rss("before load", suite.launcher_pid)
            await load_section(args, cfg, ca, metadata, report, suite)
    finally:
        for ch in channels:
            await ch.close(None)
        bare.stop()


async def range_ttfb(args: argparse.Namespace, cfg: Config, ingest: Any, metadata: Any, report: Report) -> None:
    """(g) First byte of a 1 MiB Range at the end of a big file, and at its start, through Envoy (REST)."""
    size = args.range_gib * GIB
    print(
        f"\ntime to first byte of a 1 MiB Range at the end of a {args.range_gib} GiB file, through Envoy's REST"
        f" edge ({args.runs} runs, alternating with a 1 MiB Range at its start)",
        flush=True,
    )
    tail = bytearray()

    def messages() -> Iterator[ingest_pb2.UploadRequest]:
        for off in range(0, size, UPLOAD_MESSAGE):
            data = os.urandom(UPLOAD_MESSAGE)  # new content, streamed: the file is never in memory
            if off >= size - MIB:
                tail.extend(data)
            req = ingest_pb2.UploadRequest(body=httpbody_pb2.HttpBody(data=data))
            if off == 0:
                req.name, req.declared_size = "bench-range.bin", size
            yield req

    t0 = time.perf_counter()
    call = ingest.Upload(metadata=metadata)
    for req in messages():
        await call.write(req)
    await call.done_writing()
    reply: ingest_pb2.UploadReply = await call
    file_id = (await wait_job(ingest, reply.job)).file_id
    print(f"  stored in              : {time.perf_counter() - t0:.1f} s ({file_id})")
    host = net.dial_host(cfg.listen_host)
    context = ssl.create_default_context(cafile=str(tls.files(cfg).ca)) if cfg.tls.edge else None

    def first_byte(spec: str) -> tuple[float, bytes]:
        """Seconds from the request to its first body byte (on an open connection), and the whole body."""
        if context is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, cfg.envoy_port, timeout=60, context=context
            )
        else:
            conn = http.client.HTTPConnection(host, cfg.envoy_port, timeout=60)
        try:
            conn.connect()
            t = time.perf_counter()
            conn.request("GET", f"/v1/files/{file_id}", headers={"range": f"bytes={spec}"})
            resp = conn.getresponse()
            first = resp.read(1)
            dt = time.perf_counter() - t
            body = first + resp.read()
            if resp.status != 206:
                raise BenchFailure(f"Range bytes={spec}: HTTP {resp.status} {body[:200]!r}")
            return dt, body
        finally:
            conn.close()

    at_end: list[float] = []
    at_start: list[float] = []
    for _ in range(args.runs):
        dt, body = await asyncio.to_thread(first_byte, f"-{MIB}")
        if body != bytes(tail):
            raise BenchFailure(f"Range bytes=-{MIB}: {len(body)} bytes that are not the file's last MiB")
        at_end.append(dt)
        dt, body = await asyncio.to_thread(first_byte, f"0-{MIB - 1}")
        if len(body) != MIB:
            raise BenchFailure(f"Range bytes=0-{MIB - 1}: {len(body)} bytes")
        at_start.append(dt)

    def ms(values: list[float]) -> str:
        runs_text = " ".join(f"{v * 1000:.0f}" for v in values)
        return f"median {statistics.median(values) * 1000:6.1f} ms  best {min(values) * 1000:6.1f}  (runs: {runs_text})"

    ratio = statistics.median(at_end) / statistics.median(at_start)
    print(f"  1 MiB at the end       : {ms(at_end)}")
    print(f"  1 MiB at the start     : {ms(at_start)}")
    print(
        f"  ratio                  : {ratio:5.2f}x the start (medians)   target <= {RANGE_TTFB_TARGET}x   "
        f"{report.target('range-ttfb', ratio <= RANGE_TTFB_TARGET)}"
    )


def start_hung(root: Path) -> ZdbFarm | None:
    """(i): one 0-db server with one namespace (stopped with SIGSTOP later), or None without a zdb binary."""
    if not zdb_available():
        return None
    try:
        return ZdbFarm.start(root, processes=1, per_process=1, metadata=False)
    except Exception as exc:
        raise BenchFailure(f"the 0-db for (i) did not come up: {exc}") from None


def hung_into(hung: ZdbFarm) -> Callable[[dict[str, Any]], None]:
    """A config tweak making HUNG_BACKEND the namespace of ``hung``."""

    def tweak(raw: dict[str, Any]) -> None:
        for i, spec in enumerate(raw["backends"]):
            if spec.get("name") == HUNG_BACKEND:
                raw["backends"][i] = {"name": HUNG_BACKEND, "uri": hung.backends["b00"]}
                return
        raise BenchFailure(f"the default config has no backend {HUNG_BACKEND}")

    return tweak


async def hung_data_shards(cfg: Config, meta: Any, file_id: str) -> int:
    """How many data shards of ``file_id`` sit on HUNG_BACKEND (from its record)."""
    return (await placement(cfg, meta, file_id)).data[HUNG_BACKEND]


async def hung_downloads(
    args: argparse.Namespace,
    suite: Suite,
    ingest: Any,
    meta: Any,
    metadata: Any,
    data: bytes,
    file_id: str,
    meter: CpuMeter,
    report: Report,
) -> None:
    """(i): download MB/s with the 0-db backend stopped (SIGSTOP) vs healthy, in the same run."""
    assert suite.hung is not None
    cfg, size = suite.cfg, len(data)
    # A file keeps one placement for all its chunks: use one with data shards on the 0-db, else the
    # stopped backend would only hold parity, which a healthy read never asks for.
    held = await hung_data_shards(cfg, meta, file_id)
    for i in range(10):
        if held:
            break
        data = os.urandom(size)
        file_id = (await timed_upload(ingest, data, f"bench-hung-{i}.bin", metadata)).file_id
        held = await hung_data_shards(cfg, meta, file_id)
    if not held:
        raise BenchFailure(f"no upload put a data shard on {HUNG_BACKEND}")

    async def download(step: str) -> float:
        return await checked_download(meter, step, meta, file_id, size, data)

    print(
        f"\ndownload {args.size_mib} MiB with one backend hung: {HUNG_BACKEND} is a 0-db namespace holding"
        f" {held} data shards of the file, stopped with SIGSTOP ({args.runs} runs healthy, then hung)",
        flush=True,
    )
    healthy = [await download("healthy, (i)") for _ in range(args.runs)]
    server = suite.hung.servers[0]
    server.pause()
    try:
        first = await download("first after the stop")
        hung = [await download("hung") for _ in range(args.runs)]
    finally:
        server.resume()
    print(f"  healthy download       : {fmt_runs(healthy)}")
    print(f"  first after the stop   : {first:7.1f} MB/s  (its reads miss hedge_after until the breaker opens)")
    print(f"  hung download          : {fmt_runs(hung)}")
    print(f"  ratio                  : {ratio_text(hung, healthy, 'healthy', HUNG_TARGET, report, 'hung')}")
    print(f"  cpu s/run, hung        : {meter.line('hung')}")


async def concurrent_uploads(
    args: argparse.Namespace,
    cfg: Config,
    ca: bytes | None,
    metadata: Any,
    report: Report,
    profiler: Profiler,
    meter: CpuMeter,
) -> None:
    n, each = args.concurrent, args.concurrent_mib * MIB
    print(f"\n{n} concurrent {args.concurrent_mib} MiB uploads, each on its own channel, first byte -> job DONE")
    contents = [os.urandom(each) for _ in range(n)]
    digests = [blake3.blake3(c).digest(HASH_BYTES).hex() for c in contents]
    channels = [open_channel(net.dial(cfg.address("ingest")), ca) for _ in range(n)]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 10)

        async def one(i: int) -> UploadResult:
            stub = ingest_pb2_grpc.IngestServiceStub(channels[i])
            res = await timed_upload(stub, contents[i], f"bench-concurrent-{i}.bin", metadata)
            if not res.file_id.startswith(digests[i]):
                raise BenchFailure(f"upload {i}: file id {res.file_id} does not start with its BLAKE3-192")
            return res

        with profiler.record("concurrent", ("ingest", "ingest-worker"), 120):
            t0 = time.perf_counter()
            results = await meter.run(
                "concurrent", lambda: asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
            )
            wall = time.perf_counter() - t0
    finally:
        for ch in channels:
            await ch.close(None)
    ok = [r for r in results if isinstance(r, UploadResult)]
    failed = [r for r in results if not isinstance(r, UploadResult)]
    total = len(ok) * each
    print(f"  succeeded / failed     : {len(ok)} ok / {len(failed)} failed   target all succeed   "
          f"{report.target('concurrent', not failed)}")  # fmt: skip
    print(f"  total                  : {mbps(total, wall):7.1f} MB/s  ({total / 1e6:.0f} MB in {wall:.2f} s)")
    if ok:
        slow = max(ok, key=lambda r: r.done)
        fast = min(ok, key=lambda r: r.done)
        print(
            f"  slowest / fastest      : {slow.done:.2f} s ({mbps(each, slow.done):.1f} MB/s) /"
            f" {fast.done:.2f} s ({mbps(each, fast.done):.1f} MB/s);"
            f" median {statistics.median(r.done for r in ok):.2f} s"
        )
    print(f"  cpu s                  : {meter.line('concurrent')}")
    for i, err in enumerate(failed):
        text = _rpc_text(err)
        report.failures.append(f"concurrent upload failed: {text}")
        if i < 5:
            print(f"  failure                : {text}")


class RssWatch:
    """The highest VmRSS of every process under the launcher while a block runs (sampled every 50 ms)."""

    def __init__(self, launcher_pid: int) -> None:
        self.launcher_pid = launcher_pid
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in suite_processes(self.launcher_pid):
                self.peak[p.name] = max(self.peak.get(p.name, 0.0), p.rss_mib)
            self._stop.wait(0.05)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def load_lines(what: str, latencies: list[float], errors: list[str], wall: float, nbytes: int) -> list[str]:
    ok = len(latencies)
    lines = [f"  {what:22s}: {ok} ok / {len(errors)} failed in {wall:.1f} s, {mbps(nbytes, wall):.1f} MB/s in total"]
    if latencies:
        lines.append(
            f"  {'latency':22s}: p50 {percentile(latencies, 0.5):.2f} s   p99 {percentile(latencies, 0.99):.2f} s"
            f"   max {max(latencies):.2f} s"
        )
    lines += [f"  failure                : {e}" for e in errors[:3]]
    return lines


def rss_lines(watch: RssWatch, report: Report, name: str) -> list[str]:
    """Each process's peak RSS during the load against the target, and the verdict for all of them."""
    over = {n: v for n, v in watch.peak.items() if v > RSS_TARGET_MIB}
    shown = ", ".join(f"{n} {v:.0f}" for n, v in sorted(watch.peak.items(), key=lambda kv: -kv[1]))
    verdict_text = report.target(name, not over)
    return [
        f"  peak RSS (MiB)         : {shown}",
        f"  {'every process':22s}: <= {RSS_TARGET_MIB:.0f} MiB   {verdict_text}",
    ]


def _rpc_text(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return f"{type(err).__name__}: {err}"


async def load_section(
    args: argparse.Namespace, cfg: Config, ca: bytes | None, metadata: Any, report: Report, suite: Suite
) -> None:
    """(h) 100 concurrent downloads, then 100 concurrent uploads: latency, errors, every process's peak RSS."""
    n = args.load
    size, each = args.load_mib * MIB, args.load_upload_mib * MIB
    print(
        f"\nload: {n} concurrent downloads of one {args.load_mib} MiB file, then {n} concurrent"
        f" {args.load_upload_mib} MiB uploads (each on its own channel); peak RSS during each, target <="
        f" {RSS_TARGET_MIB:.0f} MiB per process  (limits: downloads_per_process {cfg.limits.downloads_per_process},"
        f" uploads_per_process {cfg.limits.uploads_per_process}, busy_wait {cfg.limits.busy_wait:g} s)"
    )
    first = open_channel(net.dial(cfg.address("ingest")), ca)
    try:
        content = os.urandom(size)
        stored = await timed_upload(ingest_pb2_grpc.IngestServiceStub(first), content, "load.bin", metadata)
    finally:
        await first.close(None)
    check_digest([content], size, stored.file_id, "load file")
    digest = blake3.blake3(content).digest(HASH_BYTES).hex()

    async def download(channel: grpc.aio.Channel, i: int) -> float:
        stub = meta_pb2_grpc.MetaServiceStub(channel)
        h = blake3.blake3()
        got = 0
        t0 = time.perf_counter()
        async for msg in stub.Download(meta_pb2.DownloadRequest(id=stored.file_id)):
            h.update(msg.data)
            got += len(msg.data)
        dt = time.perf_counter() - t0
        if got != size or h.digest(HASH_BYTES).hex() != digest:
            raise BenchFailure(f"load download: {got} of {size} bytes, or different bytes")
        return dt

    async def upload(channel: grpc.aio.Channel, i: int) -> float:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        res = await timed_upload(stub, os.urandom(each), f"load-{i}.bin", metadata)
        return res.done

    steps: list[tuple[str, str, Callable[[grpc.aio.Channel, int], Awaitable[float]]]] = [
        ("downloads", "meta", download),
        ("uploads", "ingest", upload),
    ]
    for what, service, step in steps:
        channels = [open_channel(net.dial(cfg.address(service)), ca) for _ in range(n)]
        try:
            for ch in channels:
                await asyncio.wait_for(ch.channel_ready(), 10)
            with RssWatch(suite.launcher_pid) as watch:
                t0 = time.perf_counter()
                results = await asyncio.gather(*(step(ch, i) for i, ch in enumerate(channels)), return_exceptions=True)
                wall = time.perf_counter() - t0
        finally:
            for ch in channels:
                await ch.close(None)
        latencies = [r for r in results if isinstance(r, float)]
        errors = [_rpc_text(r) for r in results if isinstance(r, BaseException)]
        if errors:
            report.failures.append(f"load {what}: {len(errors)} of {n} failed, e.g. {errors[0]}")
        nbytes = len(latencies) * (size if what == "downloads" else each)
        for line in load_lines(f"{n} {what}", latencies, errors, wall, nbytes):
            print(line)
        for line in rss_lines(watch, report, f"rss under {what}"):
            print(line)
        await asyncio.sleep(3)  # the services hand freed memory back once idle (services/common/capacity.py)
        after = ", ".join(f"{p.name} {p.rss_mib:.0f}" for p in suite_processes(suite.launcher_pid))
        print(f"  {'RSS 3 s after (MiB)':22s}: {after}", flush=True)


def print_rss(suite: Suite, report: Report) -> None:
    print(f"\npeak RSS (VmHWM) of every process under the launcher (pid {suite.launcher_pid}), target <= "
          f"{RSS_TARGET_MIB:.0f} MiB each")  # fmt: skip
    procs = suite_processes(suite.launcher_pid)
    if not procs:
        report.failures.append("no suite processes found for the RSS figures")
        print("  (none found)")
        return
    over = [p for p in procs if p.hwm_mib > RSS_TARGET_MIB]
    phases = "".join(f"{label:>16s}" for label, _ in report.rss_marks)
    print(f"  {'process':16s} {'pid':>7s}  {'peak at the end':>16s}{phases}{'now':>14s}")
    for p in procs:
        marks = "".join(f"{hwm[p.pid]:12.1f} MiB" if p.pid in hwm else f"{'-':>16s}" for _, hwm in report.rss_marks)
        verdict_text = "ABOVE TARGET" if p in over else "ok"
        print(f"  {p.name:16s} {p.pid:7d}  {p.hwm_mib:12.1f} MiB{marks}{p.rss_mib:10.1f} MiB   {verdict_text}")
    report.target("rss", not over)


def describe(cfg: Config, suite: Suite, attached: bool) -> None:
    eng = cfg.engine
    workers = cfg.workers or os.cpu_count() or 1
    origin = "attached to" if attached else "started by this run:"
    print(f"suite: {origin} launcher pid {suite.launcher_pid}, config {suite.config_path}")
    print(
        f"  {len(cfg.backends)} backends, {eng.k}+{eng.m}, chunk {eng.chunk_size / MIB:g} MiB, ingest workers"
        f" {workers}{' (one per core)' if not cfg.workers else ''}, mode {cfg.mode},"
        f" TLS services {'on' if cfg.internal_tls else 'off'} / edge {'on' if cfg.tls.edge else 'off'}"
    )


# ----------------------------------------------------------------------------- --backend zdb

ZDB_DIR_TARGET = 0.8  # x the dir:// suite, upload and download


def start_suite(args: argparse.Namespace, scratch: Path, name: str, room: int, zdb: bool) -> tuple[Suite, list[str]]:
    """A suite on ``scratch / name`` with its 0-db servers (the caller stops it: ``Suite.stop``).

    ``zdb``: every backend a namespace of a ZdbFarm (5 zdb servers x 4), metadata on a sixth
    server. Otherwise the default dir:// backends, with HUNG_BACKEND a 0-db namespace for (i)
    when a zdb binary is there (not for the dir suite of --backend zdb: its baseline is pure dir).
    """
    hung = farm = None
    tweak: Callable[[dict[str, Any]], None] | None = None
    notes = []
    if zdb:
        farm = ZdbFarm.start(scratch / f"{name}-zdb", tuned=not args.zdb_glibc_malloc)
        tweak = farm.config
        malloc = "glibc's malloc defaults" if args.zdb_glibc_malloc else f"malloc thresholds {ZDB_MALLOC_ENV}"
        notes.append(
            f"backends b00-b19: 0-db namespaces on {len(farm.servers)} zdb servers x {farm.per_process}"
            f" (ports {', '.join(str(z.port) for z in farm.servers)}), metadata on a zdb server of its own;"
            f" zdb runs with {malloc}"
        )
        notes.append("(i) skipped: --backend zdb (every backend is 0-db; (d) takes a zdb server down)")
    else:
        hung = None if args.no_hung or args.backend == "zdb" else start_hung(scratch / f"{name}-zdb")
        tweak = hung_into(hung) if hung is not None else None
        if hung is not None:
            notes.append(f"backend {HUNG_BACKEND} is the 0-db namespace {hung.backends['b00']} (stopped in (i))")
        elif args.backend != "zdb":
            notes.append("(i) skipped: " + ("--no-hung" if args.no_hung else "no zdb binary (set ZDB_BIN)"))
    try:
        suite, more = Suite.start(scratch / name, room, tweak)
    except BaseException:
        for f in (hung, farm):
            if f is not None:
                f.stop()
        raise
    suite.hung, suite.farm = hung, farm
    return suite, notes + more


async def compare_backends(args: argparse.Namespace, zsuite: Suite, report: Report) -> None:
    """--backend zdb: upload and download MB/s of the 0-db suite against a dir:// suite, in this run.

    A second suite (default config, dir:// backends and metadata) starts beside the 0-db one;
    ``--runs`` uploads of new content (first byte -> job DONE), then as many downloads of each
    suite's first file, alternating between the suites so drift hits both. The ratios are of
    the medians, against ZDB_DIR_TARGET.
    """
    size = args.size_mib * MIB
    scratch = zsuite.cfg.data_dir.parent  # this run's temp dir (--backend zdb never attaches)
    metadata = upload_metadata(args)
    print(
        f"\n0-db against dir://: a dir:// suite started beside the 0-db one; {args.runs} uploads of"
        f" {args.size_mib} MiB, then {args.runs} downloads, alternating between the suites",
        flush=True,
    )
    t0 = time.perf_counter()
    dsuite, _ = start_suite(args, scratch, "dir", max(size, args.range_gib * GIB), zdb=False)
    channels: list[grpc.aio.Channel] = []
    try:
        print(f"  the dir:// suite came up in {time.perf_counter() - t0:.1f} s")
        stubs = {}
        for label, s in (("zdb", zsuite), ("dir", dsuite)):
            ca = tls.ca_bytes(s.cfg) if s.cfg.internal_tls else None
            ich = open_channel(net.dial(s.cfg.address("ingest")), ca)
            mch = open_channel(net.dial(s.cfg.address("meta")), ca)
            channels += [ich, mch]
            for ch in (ich, mch):
                await asyncio.wait_for(ch.channel_ready(), 10)
            extra = {"bench": os.getpid(), **(s.farm.pids() if s.farm is not None else {})}
            meter = CpuMeter(s.launcher_pid, extra)
            stubs[label] = (ingest_pb2_grpc.IngestServiceStub(ich), meta_pb2_grpc.MetaServiceStub(mch), meter)
        up: dict[str, list[float]] = {"zdb": [], "dir": []}
        down: dict[str, list[float]] = {"zdb": [], "dir": []}
        firsts: dict[str, tuple[str, bytes]] = {}
        for i in range(args.runs):
            content = os.urandom(size)  # the same new content to both: neither dedups
            for label in ("zdb", "dir"):
                ingest, _, meter = stubs[label]

                def one(ingest: Any = ingest, content: bytes = content, i: int = i) -> Awaitable[UploadResult]:
                    return timed_upload(ingest, content, f"bench-cmp-{i}.bin", metadata)

                res = await meter.run("upload", one)
                up[label].append(mbps(size, res.done))
                firsts.setdefault(label, (res.file_id, content))
        for _ in range(args.runs):
            for label in ("zdb", "dir"):
                _, meta, meter = stubs[label]
                file_id, content = firsts[label]
                down[label].append(
                    await checked_download(meter, "download", meta, file_id, size, content, f"{label} download")
                )
        for label in ("zdb", "dir"):
            print(f"  {label} upload             : {fmt_runs(up[label])}")
            print(f"  cpu s/run              : {stubs[label][2].line('upload')}")
        for label in ("zdb", "dir"):
            print(f"  {label} download           : {fmt_runs(down[label])}")
            print(f"  cpu s/run              : {stubs[label][2].line('download')}")
        for what, values in (("upload", up), ("download", down)):
            ratio = statistics.median(values["zdb"]) / statistics.median(values["dir"])
            ok = report.target(f"zdb/dir {what}", ratio >= ZDB_DIR_TARGET)
            print(f"{f'zdb/dir {what} ratio':23s}: {ratio:.2f}x   target >= {ZDB_DIR_TARGET}x   {ok}")
    finally:
        for ch in channels:
            await ch.close(None)
        dsuite.stop()


async def amain(args: argparse.Namespace) -> int:
    print("command:", shlex.join(sys.orig_argv), flush=True)
    print(
        f"gridstor end-to-end benchmark: {args.size_mib} MiB; {os.cpu_count()} cores, python"
        f" {sys.version.split()[0]}, grpcio {grpc.__version__}; MB = 10^6 bytes"
    )
    report = Report()
    scratch: Path | None = None
    suite: Suite | None = None
    try:
        if args.attach:
            suite = Suite.attach(args.attach)
        else:
            # Short: the redis socket path lives in the data dir and unix socket paths are limited.
            scratch = Path(tempfile.mkdtemp(prefix="gs-e2e-", dir=args.dir))
            t0 = time.perf_counter()
            room = max(args.size_mib * MIB, args.range_gib * GIB)
            suite, notes = start_suite(args, scratch, "data", room, zdb=args.backend == "zdb")
            for note in notes:
                print(f"  config: {note}")
            print(f"  the suite came up in {time.perf_counter() - t0:.1f} s (data {scratch / 'data'})")
        running: Suite = suite
        describe(running.cfg, running, bool(args.attach))
        try:
            await measure(args, running, report)
        except BenchFailure as exc:
            report.failures.append(str(exc))
        except grpc.aio.AioRpcError as exc:
            report.failures.append(f"gRPC call failed: {exc.code().name}: {exc.details()}")
        print_rss(running, report)
    except BenchFailure as exc:
        report.failures.append(str(exc))
    finally:
        if suite is not None and not args.attach:
            suite.stop()
        if scratch is not None:
            if args.keep:
                print(f"kept {scratch}")
            else:
                shutil.rmtree(scratch, ignore_errors=True)
    total = report.met + len(report.missed)
    missed = f"; missed: {', '.join(report.missed)}" if report.missed else ""
    print(f"\ntargets: {report.met} of {total} met{missed}")
    for note in report.notes:
        print(f"note: {note}")
    if report.failures:
        for text in report.failures:
            print(f"FAILED: {text}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=100, help="size of the single upload/download (default 100)")
    ap.add_argument(
        "--runs", type=int, default=9, help="runs of each upload, download and bare stream (median; default 9)"
    )
    ap.add_argument("--concurrent", type=int, default=20, help="concurrent uploads (default 20)")
    ap.add_argument("--concurrent-mib", type=int, default=10, help="size of each concurrent upload (default 10)")
    ap.add_argument(
        "--range-gib", type=int, default=1, help="size of the file for the end-of-file Range (default 1; 0: skip)"
    )
    ap.add_argument("--load", type=int, default=100, help="concurrent clients of the load section (0 = skip it)")
    ap.add_argument("--load-mib", type=int, default=20, help="size of the file the load downloads (default 20)")
    ap.add_argument("--load-upload-mib", type=int, default=4, help="size of each load upload (default 4)")
    ap.add_argument("--attach", metavar="CONFIG", help="measure the suite already running with this config")
    ap.add_argument("--token", help="bearer token for uploads when the gateway is not public (or GRIDSTOR_TOKEN)")
    ap.add_argument("--profile", metavar="DIR", help="py-spy raw profiles of ingest, its workers and meta into DIR")
    ap.add_argument("--dir", help="where the temp data dir goes (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp data dir (logs) afterwards")
    ap.add_argument("--no-hung", action="store_true", help="skip (i), the download with a hung 0-db backend")
    ap.add_argument(
        "--backend",
        choices=("dir", "zdb"),
        default="dir",
        help="zdb: the suite on 0-db (from ZDB_BIN: 20 namespaces on 5 zdb servers, metadata on 0-db), then"
        " its upload / download against a dir:// suite in the same run (default dir)",
    )
    ap.add_argument(
        "--zdb-glibc-malloc",
        action="store_true",
        help="--backend zdb: run zdb with glibc's malloc defaults, not bench/zdbfarm.py's ZDB_MALLOC_ENV",
    )
    ap.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bare-tls", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bare_server:
        asyncio.run(serve_bare(args.bare_tls))
        return 0
    if args.size_mib < 1 or args.runs < 1 or args.concurrent < 1 or args.concurrent_mib < 1 or args.range_gib < 0:
        ap.error("sizes and counts must be at least 1")
    if args.load < 0 or args.load_mib < 1 or args.load_upload_mib < 1:
        ap.error("--load must be >= 0, and the load sizes at least 1")
    if args.backend == "zdb" and args.attach:
        ap.error("--backend zdb starts its own suites; it cannot --attach")
    if args.backend == "zdb" and not zdb_available():
        print(f"bench/e2e.py: {ZDB_MISSING}", file=sys.stderr)
        return 2
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
