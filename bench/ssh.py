"""SSH benchmark: 100 MiB ``sftp put`` into a home and ``sftp get`` back, then Process to a stored file;
OpenSSH's sshd alongside; and main's code against this one in the same run.

In one run it starts:
  * the gateway in this process on loopback ports: meta, ingest (with its worker
    processes) and the ssh service (asyncssh), over 20 dir backends in a temp dir,
    with Debian's redis-server on a unix socket;
  * a throwaway OpenSSH sshd (Debian's openssh-server; installed with apt-get when
    missing and running as root) on a free loopback port, with its own config,
    host key and authorized_keys in the temp dir, no PAM, ``Subsystem sftp internal-sftp``.

Then it times the same ``sftp -b`` put of the same file to both servers, and the
get of it back (to /dev/null), median of 3 each, and prints MB/s and the ratio
OpenSSH / gridstor (target: <= 1.5): first with the cipher the client and each
server agree on by themselves (``default``: the line names it; gridstor offers only
AES where the CPU has AES instructions, services/ssh/ciphers.py), then with each of
chacha20-poly1305 and aes128-gcm named by ``sftp -c`` (for these, gridstor is
restarted with ``ssh.ciphers`` offering every cipher). Before that it prints what each
cipher (with the MAC an OpenSSH client pairs it with) costs asyncssh on this CPU:
MB encrypted per CPU second, 32 KiB packets, in this process. Finally it times Process of the uploaded file until its
job is DONE and checks the stored hash. MB = 10^6 bytes.

``--tree DIR`` measures the services of another checkout (e.g. /work/main) with this
script. ``--compare DIR`` runs this checkout and DIR alternately (``--rounds`` each, SFTP
only) and prints both with the ratio, so a change is judged against a baseline taken
on the same machine at the same time (target: put and get within 10%).

    .venv/bin/python bench/ssh.py                          # 100 MiB
    .venv/bin/python bench/ssh.py --mib 20                 # a quicker look
    .venv/bin/python bench/ssh.py --compare /work/main     # this tree against main's, alternating
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def _tree() -> Path:
    """The checkout whose services are measured (``--tree``; default: this one), known before the imports."""
    for i, arg in enumerate(sys.argv):
        if arg == "--tree" and i + 1 < len(sys.argv):
            return Path(sys.argv[i + 1]).resolve()
        if arg.startswith("--tree="):
            return Path(arg.split("=", 1)[1]).resolve()
    return ROOT


TREE = _tree()
sys.path[:0] = [str(TREE), str(TREE / "protos")]

import asyncssh  # noqa: E402
import blake3  # noqa: E402
import grpc  # noqa: E402

from gridstor.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, ssh_pb2, ssh_pb2_grpc  # noqa: E402
from services.cli.ssh import account_proof  # noqa: E402
from services.common import config  # noqa: E402
from services.common.config import SshConfig, build_config  # noqa: E402
from services.ingest import service as ingest_service  # noqa: E402
from services.meta import service as meta_service  # noqa: E402
from services.ssh import service as ssh_service  # noqa: E402

MIB = 1024 * 1024
RATIO_TARGET = 1.5
COMPARE_TARGET = 0.9  # --compare: this tree's MB/s at least 90% of the baseline's
RUNS = 3
SSH_SETTINGS = SshConfig.__dataclass_fields__  # an older --tree may have no ssh.ciphers
SSH_CIPHERS: tuple[str, ...] = getattr(config, "SSH_CIPHERS", ())  # every cipher, for the runs naming one
DEFAULT = "default"  # no ``-c``: the cipher the client and the server agree on by themselves
CIPHERS = (DEFAULT, "chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com")
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


def sftp_args(port: int, user: str, key: Path, cipher: str, *extra: str) -> list[str]:
    """``sftp -b -`` to ``user@127.0.0.1:port`` with ``key``, naming ``cipher`` unless it is DEFAULT."""
    return [
        "sftp",
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
        *([] if cipher == DEFAULT else ["-c", cipher]),
        *extra,
        "-i",
        str(key),
        "-b",
        "-",
        f"{user}@127.0.0.1",
    ]


async def sftp_batch(port: int, user: str, key: Path, command: str, cipher: str) -> float:
    """Seconds for one ``sftp -b`` command (connection setup included, as a user sees it)."""
    args = sftp_args(port, user, key, cipher, "-q", "-o", "LogLevel=ERROR")
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate(f"{command}\n".encode())
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sftp {command!r} to port {port} failed: {err.decode(errors='replace')}")
    return dt


PACKET = 32 * 1024
SEALS = (  # cipher, MAC (b"" for the AEAD ones); OpenSSH's client pairs aes-ctr with umac-64-etm when offered
    (b"chacha20-poly1305@openssh.com", b""),
    (b"aes128-gcm@openssh.com", b""),
    (b"aes256-gcm@openssh.com", b""),
    (b"aes128-ctr", b"umac-64-etm@openssh.com"),
    (b"aes128-ctr", b"hmac-sha2-256-etm@openssh.com"),
)


def cipher_costs(total: int = 100 * MIB) -> list[str]:
    """MB per CPU second that asyncssh encrypts and MACs with each of SEALS (CPU time: load does not skew it)."""
    from asyncssh import encryption

    data = os.urandom(PACKET)
    header = PACKET.to_bytes(4, "big")
    lines = []
    for cipher, mac in SEALS:
        key, iv, _, mac_key, _, etm = encryption.get_encryption_params(cipher, mac)
        seal = encryption.get_encryption(cipher, os.urandom(key), os.urandom(iv), mac, os.urandom(mac_key), etm)
        t0 = time.process_time()
        for seq in range(total // PACKET):
            seal.encrypt_packet(seq, header, data)
        name = cipher.decode() + (f" + {mac.decode()}" if mac else "")
        lines.append(f"  {name:48s} {total / (time.process_time() - t0) / 1e6:7.0f} MB per CPU second")
    return lines


async def negotiated(port: int, user: str, key: Path, cipher: str) -> str:
    """The cipher (and MAC) a connection agrees on, from the client's debug output."""
    args = sftp_args(port, user, key, cipher, "-o", "LogLevel=DEBUG1")
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate(b"pwd\n")
    for line in err.decode(errors="replace").splitlines():
        # debug1: kex: client->server cipher: aes128-ctr MAC: umac-64-etm@openssh.com compression: none
        if "kex: client->server cipher:" in line:
            words = line.split()
            cipher_name = words[words.index("cipher:") + 1]
            mac = words[words.index("MAC:") + 1] if "MAC:" in words else "<implicit>"
            return cipher_name if mac == "<implicit>" else f"{cipher_name} + {mac}"
    raise SystemExit(f"sftp to port {port} did not say which cipher it agreed on (exit {proc.returncode})")


async def median_put_get(
    port: int, user: str, key: Path, src: Path, cipher: str, landed: Path, size: int
) -> tuple[float, float, list[float], list[float]]:
    """Median MB/s of RUNS puts of ``src`` and RUNS gets of it back (to /dev/null); ``landed`` removed after."""
    puts, gets = [], []
    for _ in range(RUNS):
        puts.append(size / await sftp_batch(port, user, key, f"put {src} {landed.name}", cipher) / 1e6)
        gets.append(size / await sftp_batch(port, user, key, f"get {landed.name} /dev/null", cipher) / 1e6)
        await asyncio.to_thread(landed.unlink)
    return statistics.median(puts), statistics.median(gets), puts, gets


async def bench(size: int, *, with_sshd: bool, process: bool, as_json: bool) -> int:
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
        ingest_channel = grpc.aio.insecure_channel(f"127.0.0.1:{ingest_running.port}")
        cleanups.append(lambda: ingest_channel.close(None))

        async def start_ssh(config: Any) -> tuple[Any, grpc.aio.Channel, Any]:
            """The ssh service on ``config``, a channel to it (closed at the end) and its stub."""
            started = await ssh_service.start(config, port=0, ssh_port=0)
            cleanups.append(started.cleanup)
            to = grpc.aio.insecure_channel(f"127.0.0.1:{started.running.port}")
            cleanups.append(lambda: to.close(None))
            return started, to, ssh_pb2_grpc.SshServiceStub(to)

        svc, channel, ssh_stub = await start_ssh(cfg)  # its default cipher offer
        await ssh_stub.EnableAccount(
            ssh_pb2.EnableAccountRequest(
                username="bench", public_key=key.with_suffix(".pub").read_text(), max_size_mb=64 * size // MIB + 16
            )
        )
        home = svc.settings.homes_dir / "bench"

        have_sshd = with_sshd and await asyncio.to_thread(ensure_sshd)
        if have_sshd:
            sshd, sshd_port, sshd_home = await asyncio.to_thread(start_sshd, tmp, key)
            procs.append(sshd)
        user = pwd.getpwuid(os.geteuid()).pw_name

        say = (lambda *a, **k: None) if as_json else print
        say(f"gridstor ssh benchmark: {size / MIB:.0f} MiB sftp put and get, median of {RUNS}, OpenSSH sftp, loopback")
        say(f"code under test: {TREE} ({git_head(TREE)})  cpu cores: {os.cpu_count()}  python {sys.version.split()[0]}")
        if not as_json:
            print("what each cipher costs asyncssh on this CPU (encrypt + MAC, 32 KiB packets):")
            print("\n".join(cipher_costs()))
        worst = 0.0
        figures: dict[str, dict[str, float]] = {"put": {}, "get": {}}
        agreed: dict[str, str] = {}
        for cipher in CIPHERS:
            if cipher != DEFAULT and "ciphers" in SSH_SETTINGS and not svc.settings.ciphers:
                # the named ciphers need a server offering them all: restart with ssh.ciphers listing every one
                await channel.close(None)
                await svc.cleanup()
                cleanups.remove(svc.cleanup)
                every = build_config(
                    raw | {"ports": {"meta": meta_running.port}, "ssh": {"ciphers": list(SSH_CIPHERS)}}
                )
                svc, channel, ssh_stub = await start_ssh(every)
            put, get, puts, gets = await median_put_get(svc.ssh_port, "bench", key, src, cipher, home / "big.bin", size)
            figures["put"][cipher], figures["get"][cipher] = put, get
            agreed[cipher] = await negotiated(svc.ssh_port, "bench", key, cipher)
            label = f"{cipher} ({agreed[cipher]})" if cipher == DEFAULT else cipher
            line = f"  {label:32s} gridstor (asyncssh) put {put:6.1f} get {get:6.1f} MB/s"
            if have_sshd:
                their_put, their_get, _, _ = await median_put_get(
                    sshd_port, user, key, src, cipher, sshd_home / "big.bin", size
                )
                ratio = max(their_put / put, their_get / get)
                worst = max(worst, ratio)
                ok = "ok" if ratio <= RATIO_TARGET else "ABOVE TARGET"
                line += f"   OpenSSH sshd put {their_put:6.1f} get {their_get:6.1f} MB/s   worst ratio {ratio:4.2f}"
                line += f" (target <= {RATIO_TARGET})  {ok}"
            runs = ", ".join(f"{p:.0f}/{g:.0f}" for p, g in zip(puts, gets, strict=True))
            say(line + f"   [put/get runs {runs}]")
        if as_json:
            print(json.dumps({"tree": str(TREE), "head": git_head(TREE), "agreed": agreed, **figures}))
        if process:
            await process_figure(svc.ssh_port, key, src, size, home, ssh_stub, ingest_channel)
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


async def process_figure(
    ssh_port: int, key: Path, src: Path, size: int, home: Path, ssh_stub: Any, ingest_channel: grpc.aio.Channel
) -> None:
    """Process: the file put over SFTP into a stored file, end to end."""
    await sftp_batch(ssh_port, "bench", key, f"put {src} big.bin", CIPHERS[0])
    ingest_stub = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
    proof = account_proof(asyncssh.read_private_key(key), "Process", "bench")  # the account is the key's
    t0 = time.perf_counter()
    reply = await ssh_stub.Process(ssh_pb2.ProcessRequest(username="bench", path="big.bin", remove=True, proof=proof))
    t_queued = time.perf_counter() - t0
    status = await ingest_stub.Status(ingest_pb2.StatusRequest(job=reply.job, wait=True, timeout_seconds=300))
    t_done = time.perf_counter() - t0
    if status.state != common_pb2.JOB_STATE_DONE:
        raise SystemExit(f"Process job failed: {status.error}")
    want = blake3.blake3(await asyncio.to_thread(src.read_bytes)).hexdigest(24)
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


def git_head(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def compare(baseline: Path, rounds: int, mib: int) -> int:
    """This tree and ``baseline``, alternately, SFTP put/get only; medians per side and the ratio."""
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"this": [], "baseline": []}
    for r in range(rounds):
        for side, tree in (("baseline", baseline), ("this", ROOT)):
            argv = [sys.executable, str(Path(__file__).resolve()), "--tree", str(tree), "--mib", str(mib)]
            done = subprocess.run([*argv, "--json", "--no-sshd", "--no-process"], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{side} run failed:\n{done.stdout}\n{done.stderr}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs[side].append(result)
            print(
                f"round {r + 1} {side:8s} ({result['head']}): "
                + "  ".join(f"{op} {c.split('@')[0]} {result[op][c]:6.1f}" for op in ("put", "get") for c in CIPHERS)
                + f"  (default: {result.get('agreed', {}).get(DEFAULT, '?')})",
                flush=True,
            )
    target = f"this >= {COMPARE_TARGET:.0%} of baseline"
    print(f"\nmedians over {rounds} alternating rounds, {mib} MiB, MB/s (target: {target})")
    worst = 1.0
    for op in ("put", "get"):
        for cipher in CIPHERS:
            base = statistics.median(r[op][cipher] for r in runs["baseline"])
            this = statistics.median(r[op][cipher] for r in runs["this"])
            worst = min(worst, this / base)
            ok = "ok" if this / base >= COMPARE_TARGET else "BELOW TARGET"
            print(f"  {op} {cipher:32s} baseline {base:6.1f}  this {this:6.1f}  ratio {this / base:4.2f}  {ok}")
    return 0 if worst >= COMPARE_TARGET else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=100, help="file size in MiB (default 100)")
    ap.add_argument("--tree", help="measure the services of this checkout (default: the one holding this script)")
    ap.add_argument("--compare", metavar="DIR", help="run this checkout and DIR alternately, SFTP put/get only")
    ap.add_argument("--rounds", type=int, default=3, help="--compare: rounds per side (default 3)")
    ap.add_argument("--no-sshd", action="store_true", help="skip the OpenSSH sshd comparison")
    ap.add_argument("--no-process", action="store_true", help="skip Process to a stored file")
    ap.add_argument("--json", action="store_true", help="print only one JSON line of the SFTP figures")
    args = ap.parse_args()
    os.environ.setdefault("GRIDSTOR_LOG_LEVEL", "WARNING")  # the ingest workers' JSON lines would drown the figures
    if args.compare:
        sys.exit(compare(Path(args.compare).resolve(), args.rounds, args.mib))
    code = asyncio.run(
        bench(args.mib * MIB, with_sshd=not args.no_sshd, process=not args.no_process, as_json=args.json)
    )
    sys.exit(code)


if __name__ == "__main__":
    main()
