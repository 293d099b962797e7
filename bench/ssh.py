"""SSH benchmark: 100 MiB ``sftp put`` into a home, then Process to a stored file; OpenSSH's sftp alongside.

In one run it starts:
  * the gateway in this process on loopback ports: meta, ingest (with its worker
    processes) and the ssh service (asyncssh), over 20 dir backends in a temp dir,
    with Debian's redis-server on a unix socket;
  * a throwaway OpenSSH sshd (Debian's openssh-server; installed with apt-get when
    missing and running as root) on a free loopback port, with its own config,
    host key and authorized_keys in the temp dir, no PAM, ``Subsystem sftp internal-sftp``.

Then, for each cipher (the client's default chacha20-poly1305, and aes128-gcm), it
times the same ``sftp -b`` put of the same file to both servers (median of 3) and
prints MB/s and the ratio OpenSSH / gridstor (target: <= 1.5). Finally it times
Process of the uploaded file until its job is DONE and checks the stored hash.
MB = 10^6 bytes.

    .venv/bin/python bench/ssh.py            # 100 MiB
    .venv/bin/python bench/ssh.py --mib 20   # a quicker look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

import asyncssh  # noqa: E402
import blake3  # noqa: E402
import grpc  # noqa: E402

from gridstor.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, ssh_pb2, ssh_pb2_grpc  # noqa: E402
from services.cli.ssh import account_proof  # noqa: E402
from services.common.config import build_config  # noqa: E402
from services.ingest import service as ingest_service  # noqa: E402
from services.meta import service as meta_service  # noqa: E402
from services.ssh import service as ssh_service  # noqa: E402

MIB = 1024 * 1024
RATIO_TARGET = 1.5
RUNS = 3
CIPHERS = ("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com")
SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_input(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MIB)
            f.write(os.urandom(n))
            left -= n


def prepare(src: Path, size: int, key: Path) -> None:
    """The input file and the client's key pair."""
    make_input(src, size)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)


def ensure_sshd() -> bool:
    """Debian's sshd is there (installing openssh-server when root may); False when it cannot be."""
    if os.path.exists(SSHD):
        return True
    if os.geteuid() != 0:
        print("OpenSSH sshd missing and not root: run `apt-get install openssh-server` to compare")
        return False
    print("installing openssh-server for the comparison ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "openssh-server"], check=False, env=env, stdout=subprocess.DEVNULL
    )
    return os.path.exists(SSHD)


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is missing: apt-get install redis-server")
    sock = tmp / "redis.sock"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--dir", str(tmp), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        if sock.exists():
            break
        time.sleep(0.02)
    return proc, f"unix://{sock}"


def start_sshd(tmp: Path, client_key: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """A throwaway sshd: its own config, host key, authorized_keys and start folder."""
    d = tmp / "sshd"
    d.mkdir()
    home = d / "home"
    home.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    shutil.copy(f"{client_key}.pub", d / "authorized_keys")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    port = free_port()
    (d / "sshd_config").write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / "host_key"}
PidFile {d / "sshd.pid"}
AuthorizedKeysFile {d / "authorized_keys"}
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
Subsystem sftp internal-sftp -d {home}
"""
    )
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.DEVNULL)
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.02)
    return proc, port, home


async def sftp_put(port: int, user: str, key: Path, src: Path, name: str, cipher: str) -> float:
    """Seconds for one ``sftp -b`` put (connection setup included, as a user sees it)."""
    args = [
        "sftp",
        "-q",
        "-P",
        str(port),
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
        "-c",
        cipher,
        "-i",
        str(key),
        "-b",
        "-",
        f"{user}@127.0.0.1",
    ]
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate(f"put {src} {name}\n".encode())
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sftp to port {port} failed: {err.decode(errors='replace')}")
    return dt


async def median_put(
    port: int, user: str, key: Path, src: Path, cipher: str, landed: Path, size: int
) -> tuple[float, list[float]]:
    """Median MB/s of RUNS puts of ``src``; the uploaded copy (``landed``) is removed after each."""
    rates = []
    for _ in range(RUNS):
        rates.append(size / await sftp_put(port, user, key, src, landed.name, cipher) / 1e6)
        await asyncio.to_thread(landed.unlink)
    return statistics.median(rates), rates


async def bench(size: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="gridstor-bench-ssh-"))
    cleanups: list[Callable[[], Awaitable[None]]] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        src = tmp / "input.bin"
        key = tmp / "client_key"
        await asyncio.to_thread(prepare, src, size, key)
        redis, redis_url = await asyncio.to_thread(start_redis, tmp)
        procs.append(redis)
        raw: dict[str, Any] = {"data_dir": str(tmp / "data"), "redis": redis_url, "max_upload": size + MIB}
        meta_running, meta_cleanup = await meta_service.build(build_config(raw), port=0)
        cleanups.append(meta_cleanup)
        cfg = build_config(raw | {"ports": {"meta": meta_running.port}})
        ingest_running, ingest_cleanup = await ingest_service.build(cfg, port=0)
        cleanups.append(ingest_cleanup)
        svc = await ssh_service.start(cfg, port=0, ssh_port=0)
        cleanups.append(svc.cleanup)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{svc.running.port}")
        ingest_channel = grpc.aio.insecure_channel(f"127.0.0.1:{ingest_running.port}")
        ssh_stub = ssh_pb2_grpc.SshServiceStub(channel)
        await ssh_stub.EnableAccount(
            ssh_pb2.EnableAccountRequest(
                username="bench", public_key=key.with_suffix(".pub").read_text(), max_size_mb=64 * size // MIB + 16
            )
        )
        home = svc.settings.homes_dir / "bench"

        have_sshd = await asyncio.to_thread(ensure_sshd)
        if have_sshd:
            sshd, sshd_port, sshd_home = await asyncio.to_thread(start_sshd, tmp, key)
            procs.append(sshd)
        user = pwd.getpwuid(os.geteuid()).pw_name

        print(f"gridstor ssh benchmark: {size / MIB:.0f} MiB sftp put, median of {RUNS}, client OpenSSH sftp, loopback")
        print(f"cpu cores: {os.cpu_count()}  python {sys.version.split()[0]}")
        worst = 0.0
        for cipher in CIPHERS:
            ours, ours_all = await median_put(svc.ssh_port, "bench", key, src, cipher, home / "big.bin", size)
            line = f"  {cipher:32s} gridstor (asyncssh) {ours:7.1f} MB/s"
            if have_sshd:
                theirs, _ = await median_put(sshd_port, user, key, src, cipher, sshd_home / "big.bin", size)
                ratio = theirs / ours
                worst = max(worst, ratio)
                ok = "ok" if ratio <= RATIO_TARGET else "ABOVE TARGET"
                line += f"   OpenSSH sshd {theirs:7.1f} MB/s   ratio {ratio:4.2f} (target <= {RATIO_TARGET})  {ok}"
            print(line + f"   [runs {', '.join(f'{r:.0f}' for r in ours_all)}]")

        # Process: the uploaded file to a stored file
        await sftp_put(svc.ssh_port, "bench", key, src, "big.bin", CIPHERS[0])
        ingest_stub = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
        proof = account_proof(asyncssh.read_private_key(key), "Process", "bench")  # the account is the key's
        t0 = time.perf_counter()
        reply = await ssh_stub.Process(
            ssh_pb2.ProcessRequest(username="bench", path="big.bin", remove=True, proof=proof)
        )
        t_queued = time.perf_counter() - t0
        status = await ingest_stub.Status(ingest_pb2.StatusRequest(job=reply.job, wait=True, timeout_seconds=300))
        t_done = time.perf_counter() - t0
        if status.state != common_pb2.JOB_STATE_DONE:
            raise SystemExit(f"Process job failed: {status.error}")
        want = blake3.blake3(src.read_bytes()).hexdigest(24)
        assert status.hash == want, "stored hash differs from the file's"
        for _ in range(100):
            if not (home / "big.bin").exists():
                break
            await asyncio.sleep(0.05)
        print(
            f"\nProcess to a stored file: {size / t_done / 1e6:7.1f} MB/s end to end"
            f" ({t_queued:.2f} s to queue the job: copy into the spool + hash; {t_done:.2f} s until DONE)"
        )
        print(f"  file id {status.file_id}, hash verified, removed from the home: {not (home / 'big.bin').exists()}")
        await channel.close(None)
        await ingest_channel.close(None)
        return 0 if worst <= RATIO_TARGET else 1
    finally:
        for fn in reversed(cleanups):
            try:
                await fn()
            except Exception as exc:  # a cleanup failure must not hide the figures
                print(f"cleanup: {exc}", file=sys.stderr)
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=100, help="file size in MiB (default 100)")
    args = ap.parse_args()
    os.environ.setdefault("GRIDSTOR_LOG_LEVEL", "WARNING")  # the ingest workers' JSON lines would drown the figures
    sys.exit(asyncio.run(bench(args.mib * MIB)))


if __name__ == "__main__":
    main()
