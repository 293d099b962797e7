"""The CLI's commands: each takes the Session and the parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import stat as statmod
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import blake3
from google.api import httpbody_pb2
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from gridstor.v1 import auth_pb2, common_pb2, ingest_pb2, meta_pb2
from services.cli.connect import default_key_path, load_signing_key, token_path, write_private
from services.cli.failures import EXIT_OK, EXIT_USAGE, CliFailure
from services.cli.progress import Progress
from services.cli.session import UNARY_TIMEOUT, Session
from services.common.errors import InvalidFileId
from services.common.ids import parse_file_id

UPLOAD_MESSAGE = 256 * 1024  # measured fastest for uploads when the design was made
AUTH_DOMAIN = "gridstor/v1/auth"
RECEIPT_DOMAIN = b"gridstor/v1/receipt\n"
HASH_BYTES = 24
WAIT_STEP = 60  # seconds per Status long-poll when no progress bar needs refreshing
WAIT_STEP_TTY = 1
DEADLINE_SLACK = 15.0  # the server answers TIMEOUT before our own deadline cuts a long-poll

_FINISHED = (common_pb2.JOB_STATE_DONE, common_pb2.JOB_STATE_ERROR)


def _when(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def check_id(text: str) -> str:
    """``text`` if it is a well-formed file id; else a clear failure before any call is made."""
    try:
        parse_file_id(text)
    except InvalidFileId as exc:
        raise CliFailure(f"invalid file id {text[:80]!r}: {exc}") from None
    return text


# -- keygen / login ---------------------------------------------------------------------------------------


def cmd_keygen(s: Session, a: argparse.Namespace) -> int:
    """Make an ed25519 key pair for allowlist mode; print the public key for the gateway config."""
    path = Path(a.out).expanduser() if a.out else default_key_path()
    key = SigningKey.generate()
    public = key.verify_key.encode().hex()
    write_private(path, key.encode().hex() + "\n", overwrite=a.force)
    pub_path = path.with_name(path.name + ".pub")
    pub_path.write_text(public + "\n")
    s.result(public, {"public_key": public, "key_file": str(path), "public_key_file": str(pub_path)})
    s.note(
        f"private key written to {path} (mode 0600: keep it secret); public key in {pub_path}.\n"
        "Allow it in the gateway config (mode: allowlist) under a name of your choice:\n"
        f"  allowlist:\n    NAME: {public}\n"
        f"then: gridstor login --identity NAME --key {path}"
    )
    return EXIT_OK


def _read_secret(a: argparse.Namespace) -> str:
    if a.secret_env:
        value = os.environ.get(a.secret_env)
        if value is None:
            raise CliFailure(f"--secret-env: the environment variable {a.secret_env} is not set", EXIT_USAGE)
        return value
    try:
        if a.secret_file == "-":
            text = sys.stdin.readline()
        else:
            text = Path(a.secret_file).expanduser().read_text()
    except OSError as exc:
        raise CliFailure(f"cannot read the secret file {a.secret_file}: {exc.strerror}") from None
    return text.rstrip("\r\n")


def cmd_login(s: Session, a: argparse.Namespace) -> int:
    """Authenticate (allowlist signature, shared secret, or nothing in public mode) and save the token."""
    req = auth_pb2.AuthenticateRequest(identity=a.identity or "")
    if a.secret_file or a.secret_env:
        req.secret = _read_secret(a)
        how = "secret"
    elif a.key or a.identity:
        if not a.identity:
            raise CliFailure(
                "--key needs --identity NAME (the name the gateway's allowlist gives your key)", EXIT_USAGE
            )
        key = load_signing_key(Path(a.key).expanduser() if a.key else default_key_path())
        req.epoch = int(time.time())
        req.signature = key.sign(f"{AUTH_DOMAIN}\n{a.identity}\n{req.epoch}".encode()).signature
        how = "allowlist"
    else:
        how = "public"
    with s.rpc("auth"):
        reply = s.auth().Authenticate(req, timeout=UNARY_TIMEOUT)
    path = token_path()
    write_private(path, reply.token + "\n")
    who = reply.identity or "(no identity)"
    s.result(
        f"logged in as {who}; token valid until {_when(reply.expires_at)}, saved to {path}",
        {
            "identity": reply.identity,
            "expires_at": reply.expires_at,
            "key_id": reply.key_id,
            "token_file": str(path),
            "method": how,
        },
    )
    return EXIT_OK


# -- put / status ---------------------------------------------------------------------------------------


def _status_dict(r: ingest_pb2.StatusReply) -> dict[str, Any]:
    return {
        "job": r.job,
        "state": common_pb2.JobState.Name(r.state).removeprefix("JOB_STATE_"),
        "result": r.result,
        "file_id": r.file_id,
        "size": r.size,
        "hash": r.hash,
        "error": r.error,
        "progress_bytes": r.progress_bytes,
        "deduplicated": r.deduplicated,
        "waiting": r.waiting,
    }


def wait_job(s: Session, job: str, timeout: float | None, *, label: str = "storing") -> ingest_pb2.StatusReply:
    """Long-poll Status until the job ends or ``timeout`` seconds pass (None: no limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    ingest = s.ingest()
    with Progress(label) as bar:
        step_max = WAIT_STEP_TTY if bar.enabled else WAIT_STEP
        while True:
            step = step_max
            if deadline is not None:
                step = max(1, min(step_max, int(deadline - time.monotonic() + 0.999)))
            asked = time.monotonic()
            with s.rpc("ingest"):
                reply = ingest.Status(
                    ingest_pb2.StatusRequest(job=job, wait=True, timeout_seconds=step), timeout=step + DEADLINE_SLACK
                )
            if reply.state in _FINISHED:
                if reply.state == common_pb2.JOB_STATE_DONE and reply.size:
                    bar.set(reply.size, reply.size)
                return reply
            bar.set(reply.progress_bytes, reply.size or None)
            if deadline is not None and time.monotonic() >= deadline:
                return reply
            if time.monotonic() - asked < 0.2:  # a server that does not long-poll: don't spin
                time.sleep(0.5)


def wait_stored(s: Session, job: str, timeout: float | None) -> ingest_pb2.StatusReply:
    """``wait_job`` until the job is DONE; CliFailure when it failed or ``timeout`` passed first."""
    r = wait_job(s, job, timeout)
    if r.state == common_pb2.JOB_STATE_ERROR:
        raise CliFailure(f"job {job} failed: {r.error or r.result}")
    if r.state != common_pb2.JOB_STATE_DONE:
        raise CliFailure(
            f"timed out: job {job} is still being stored after {timeout:g} s;"
            f" check later with: gridstor status {job} --wait"
        )
    return r


def verify_receipt(s: Session, r: ingest_pb2.StatusReply, job: str, size: int, hash_hex: str) -> str:
    """Check the job's receipt against the gateway's PublicKey and what was sent; the signing key's id."""
    receipt = r.receipt
    if not r.HasField("receipt") or not receipt.body:
        raise CliFailure(f"job {job} is done but the gateway sent no receipt, so {r.file_id} cannot be verified")
    with s.rpc("auth"):
        pk = s.auth().PublicKey(auth_pb2.PublicKeyRequest(), timeout=UNARY_TIMEOUT)
    if receipt.key_id and pk.key_id and receipt.key_id != pk.key_id:
        raise CliFailure(f"receipt of job {job} is signed by key {receipt.key_id}, the gateway's key is {pk.key_id}")
    try:
        VerifyKey(pk.public_key).verify(RECEIPT_DOMAIN + receipt.body, receipt.signature)
    except (BadSignatureError, ValueError, TypeError):
        raise CliFailure(f"receipt of job {job} does not verify against the gateway's public key") from None
    body = common_pb2.ReceiptBody.FromString(receipt.body)
    mismatches = [
        name
        for name, got, want in (
            ("file id", body.file_id, r.file_id),
            ("size", body.size, size),
            ("hash", body.hash, hash_hex),
            ("job", body.job, job),
        )
        if got != want
    ]
    if mismatches or not r.file_id.startswith(hash_hex):
        raise CliFailure(f"receipt of job {job} does not match the upload ({', '.join(mismatches) or 'file id'})")
    return pk.key_id


def _open_input(path: str) -> tuple[IO[bytes], int | None, bool]:
    """The file to upload, its size when known, and whether we opened it (stdin is not closed).

    stdin is read through its raw descriptor, not ``sys.stdin.buffer``: grpc reads the request
    iterator on a thread of its own, and when the server fails the call while that thread waits
    for stdin, a BufferedReader's lock held at exit aborts the interpreter ("Fatal Python error:
    _enter_buffered_busy", exit 134). A raw FileIO has no such lock.
    """
    if path == "-":
        return open(sys.stdin.fileno(), "rb", buffering=0, closefd=False), None, True
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except IsADirectoryError:
        raise CliFailure(f"{path} is a directory; upload a file (e.g. tar it first)") from None
    except OSError as exc:
        raise CliFailure(f"cannot read {path}: {exc.strerror}") from None
    st = os.fstat(f.fileno())
    if statmod.S_ISDIR(st.st_mode):
        f.close()
        raise CliFailure(f"{path} is a directory; upload a file (e.g. tar it first)")
    return f, (st.st_size if statmod.S_ISREG(st.st_mode) else None), True


def read_block(src: IO[bytes], size: int) -> bytes:
    """``size`` bytes of ``src``, fewer only at its end (a pipe's read hands out what it holds now)."""
    parts: list[bytes] = []
    want = size
    while want > 0:
        data = src.read(want)
        if not data:
            break
        parts.append(data)
        want -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _ReadFailed(Exception):
    """Reading the local file failed mid-upload (the call is cancelled; the error is reported)."""


def cmd_put(s: Session, a: argparse.Namespace) -> int:
    """Stream a file to ingest in 256 KiB messages; print the job id, or the file id once stored (--wait)."""
    src, size, owned = _open_input(a.file)
    name = a.name if a.name is not None else ("" if a.file == "-" else os.path.basename(a.file))
    hasher = blake3.blake3()
    sent = 0
    read_error: list[OSError] = []
    label = f"put {name or 'stdin'}"
    try:
        with Progress(label, size) as bar:

            def read() -> bytes:
                nonlocal sent
                try:
                    data = read_block(src, UPLOAD_MESSAGE)
                except OSError as exc:
                    read_error.append(exc)
                    raise _ReadFailed from exc  # cancels the call: a truncated file must not be stored
                hasher.update(data)
                sent += len(data)
                bar.update(len(data))
                return data

            def requests() -> Any:
                first = ingest_pb2.UploadRequest(name=name, content_type=a.content_type or "")
                if size is not None:
                    first.declared_size = size
                data = read()
                first.body.data = data
                yield first
                while data:
                    data = read()
                    if data:
                        yield ingest_pb2.UploadRequest(body=httpbody_pb2.HttpBody(data=data))

            try:
                with s.rpc("ingest"):
                    reply = s.ingest().Upload(requests(), metadata=s.auth_metadata())
            except CliFailure:
                if read_error:
                    raise CliFailure(f"cannot read {a.file}: {read_error[0].strerror}") from None
                raise
    finally:
        if owned:
            src.close()
    hash_hex = hasher.digest(HASH_BYTES).hex()
    if reply.size != sent or reply.hash != hash_hex:
        raise CliFailure(
            f"the gateway received {reply.size} bytes with hash {reply.hash[:16]}..., but {sent} bytes with hash"
            f" {hash_hex[:16]}... were sent (job {reply.job})"
        )
    if not a.wait:
        s.result(reply.job, {"job": reply.job, "size": reply.size, "hash": reply.hash})
        return EXIT_OK
    r = wait_stored(s, reply.job, a.timeout)
    key_id = verify_receipt(s, r, reply.job, sent, hash_hex)
    s.result(
        r.file_id,
        {
            "job": reply.job,
            "file_id": r.file_id,
            "size": r.size,
            "hash": r.hash,
            "deduplicated": r.deduplicated,
            "receipt": {"verified": True, "key_id": key_id},
        },
    )
    return EXIT_OK


def cmd_status(s: Session, a: argparse.Namespace) -> int:
    """Where a job stands: ACTIVE, ERROR:<reason> or the file id (exit 1 for ERROR or a --wait that timed out)."""
    if a.wait:
        r = wait_job(s, a.job, a.timeout, label="waiting")
    else:
        with s.rpc("ingest"):
            r = s.ingest().Status(ingest_pb2.StatusRequest(job=a.job), timeout=UNARY_TIMEOUT)
    text = r.result or common_pb2.JobState.Name(r.state).removeprefix("JOB_STATE_")
    if r.state == common_pb2.JOB_STATE_ACTIVE and a.wait:
        text = "TIMEOUT"  # our own deadline passed between two long-polls
    if r.waiting and r.state in (common_pb2.JOB_STATE_ACTIVE, common_pb2.JOB_STATE_TIMEOUT):
        text += f" (waiting: {r.waiting})"
    s.result(text, _status_dict(r))
    if r.state == common_pb2.JOB_STATE_ERROR:
        raise CliFailure(f"job {a.job} failed: {r.error or r.result}")
    if a.wait and r.state not in _FINISHED:
        raise CliFailure(f"timed out: job {a.job} is still active after {a.timeout:g} s")
    return EXIT_OK


# -- get / exists / stat -----------------------------------------------------------------------------------


def _target(output: str, file_id: str) -> Path:
    path = Path(output).expanduser()
    return path / file_id if path.is_dir() else path


def cmd_get(s: Session, a: argparse.Namespace) -> int:
    """Download a file (or a range) to a file or stdout; a file appears only once complete."""
    file_id = check_id(a.id)
    to_stdout = a.output in (None, "-")
    if a.output is None and s.stdout.isatty():
        raise CliFailure("not writing file bytes to a terminal: use -o FILE (or -o - to insist)", EXIT_USAGE)
    target = None if to_stdout else _target(a.output, file_id)
    if target is not None and not target.parent.is_dir():
        raise CliFailure(f"cannot write {target}: the folder {target.parent} does not exist")
    req = meta_pb2.DownloadRequest(id=file_id, offset=a.offset, length=a.length)
    tmp: Path | None = None
    out: IO[bytes]
    call = s.meta().Download(req)
    received = 0
    try:
        with s.rpc("meta"):
            headers = {k: v for k, v in call.initial_metadata() if isinstance(v, str)}
            expected = _expected_length(headers, a.offset, a.length)
            if target is None:
                out = s.stdout.buffer if hasattr(s.stdout, "buffer") else sys.stdout.buffer
            else:
                fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
                tmp = Path(name)
                out = os.fdopen(fd, "wb")
            with Progress(f"get {file_id[:12]}...", expected) as bar:
                try:
                    for msg in call:
                        out.write(msg.data)
                        received += len(msg.data)
                        bar.update(len(msg.data))
                    out.flush()
                finally:
                    if target is not None:
                        out.close()
        if expected is not None and received != expected:
            raise CliFailure(f"download of {file_id} incomplete: received {received} of {expected} bytes")
        if target is not None and tmp is not None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600; the result is an ordinary file
            os.replace(tmp, target)
            tmp = None
    finally:
        call.cancel()  # type: ignore[no-untyped-call]  # a no-op once the stream ended; stops the server early on an error
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    if target is not None:
        s.note(f"saved {received} bytes to {target}")
    if s.json and target is not None:
        s.result("", {"id": file_id, "bytes": received, "output": str(target), "offset": a.offset})
    return EXIT_OK


def _expected_length(headers: dict[str, str], offset: int, length: int) -> int | None:
    """Bytes the stream must deliver, from x-gridstor-length (or x-gridstor-size and the range asked)."""
    with contextlib.suppress(KeyError, ValueError):
        return int(headers["x-gridstor-length"])
    try:
        size = int(headers["x-gridstor-size"])
    except (KeyError, ValueError):
        return None
    rest = max(0, size - offset)
    return rest if length == 0 else min(rest, length)


def cmd_exists(s: Session, a: argparse.Namespace) -> int:
    """Exit 0 and print the canonical id when the file is stored; exit 1 when not."""
    file_id = check_id(a.id)
    with s.rpc("meta"):
        r = s.meta().Exists(meta_pb2.ExistsRequest(id=file_id), timeout=UNARY_TIMEOUT)
    if s.json:
        s.result("", {"exists": r.exists, "id": r.id or file_id})
    elif r.exists:
        s.result(r.id or file_id, {})
    if not r.exists:
        raise CliFailure(f"not found: no file with id {file_id}")
    return EXIT_OK


def cmd_stat(s: Session, a: argparse.Namespace) -> int:
    """Size, type, date and coding of a stored file."""
    file_id = check_id(a.id)
    with s.rpc("meta"):
        info = s.meta().Stat(meta_pb2.StatRequest(id=file_id), timeout=UNARY_TIMEOUT).info
    data = {
        "id": info.id,
        "size": info.size,
        "hash": info.hash,
        "ext": info.ext,
        "content_type": info.content_type,
        "created": info.created,
        "meta_id": info.meta_id,
        "k": info.k,
        "m": info.m,
        "chunk_size": info.chunk_size,
        "chunks": info.chunks,
        "unwritten_shards": info.unwritten_shards,
    }
    rows = [
        ("id", info.id),
        ("size", f"{info.size} bytes"),
        ("type", info.content_type or "-"),
        ("created", _when(info.created) if info.created else "-"),
        ("hash", f"blake3-192 {info.hash}"),
        ("coding", f"{info.k}+{info.m} shards, {info.chunks} chunk(s) of {info.chunk_size} bytes"),
        ("meta id", str(info.meta_id)),
    ]
    if info.unwritten_shards:
        rows.append(
            ("health", f"UNDER-REPLICATED: {info.unwritten_shards} shard(s) not written yet (maint rebuilds them)")
        )
    s.result("\n".join(f"{k + ':':<9}{v}" for k, v in rows), data)
    return EXIT_OK
