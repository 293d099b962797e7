"""Process: a file or folder of a home becomes an upload job; the path goes only after the job succeeded."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import grpc
import pytest

from gridstor.v1 import common_pb2, ssh_pb2
from services.common.jobs import JobStore, connect
from tests.helpers import deep_folder, remove_tree, wait_until_async
from tests.ssh.conftest import SshEnv, SshFactory, restart
from tests.ssh.test_clients import make_tree, tree

MiB = 1024 * 1024


async def process(env: SshEnv, path: str, remove: bool | None = None, user: str = "alice") -> ssh_pb2.ProcessReply:
    return await env.process(user, path, remove)


def pending(env: SshEnv) -> list[str]:
    d = env.svc.state_dir / "pending"
    return sorted(os.listdir(d)) if d.exists() else []


async def test_file_and_folder_to_stored_files(ssh_factory: SshFactory, tmp_path: Path) -> None:
    env = await ssh_factory(ingest=True)
    assert env.suite is not None
    await env.enable("alice", mb=64)
    photo = tmp_path / "photo.JPG"
    photo.write_bytes(os.urandom(3 * MiB + 17))
    src = tmp_path / "album"
    make_tree(src)
    os.symlink("a.txt", src / "link-to-a")
    res = await env.sftp("alice", f"mkdir docs\nput {photo} docs/photo.JPG\nput -r {src} album\n")
    assert res.rc == 0, res
    os.symlink("a.txt", env.home("alice") / "album" / "link-to-a")  # sftp cannot make links; rsync could

    # a file: kept with remove=false
    kept = await process(env, "/docs//photo.JPG", remove=False)
    assert (kept.path, kept.directory, kept.name) == ("docs/photo.JPG", False, "photo.JPG")
    status = await env.suite.wait(kept.job)
    assert status.state == common_pb2.JOB_STATE_DONE, status.error
    assert status.file_id.endswith(".jpg") and status.size == 3 * MiB + 17
    assert await env.suite.download(status.file_id) == photo.read_bytes()
    assert (env.home("alice") / "docs" / "photo.JPG").exists() and pending(env) == []

    # remove unset means remove: gone once the job is done (dedup: the same content is stored already)
    again = await process(env, "docs/photo.JPG")
    status = await env.suite.wait(again.job)
    assert status.state == common_pb2.JOB_STATE_DONE and status.deduplicated
    await wait_until_async(lambda: not (env.home("alice") / "docs" / "photo.JPG").exists(), "the stored file removed")
    await wait_until_async(lambda: pending(env), "no pending job left", until=lambda p: p == [])

    # a folder: streamed as .tar.gz; it unpacks to the same tree
    folder = await process(env, "album")
    assert (folder.path, folder.directory, folder.name) == ("album", True, "album.tar.gz")
    status = await env.suite.wait(folder.job)
    assert status.state == common_pb2.JOB_STATE_DONE, status.error
    assert status.file_id.endswith(".tar.gz")
    data = await env.suite.download(status.file_id)
    out = tmp_path / "unpacked"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = tar.getnames()
        assert all(n == "album" or n.startswith("album/") for n in names)
        assert all(m.uid == 0 and m.uname == "" for m in tar.getmembers())
        tar.extractall(out, filter="tar")
    assert tree(out / "album") == tree(src)
    assert os.readlink(out / "album" / "link-to-a") == "a.txt"
    await wait_until_async(lambda: not (env.home("alice") / "album").exists(), "the stored folder removed")
    size = await env.size("alice")
    assert (size.used_bytes, size.files) == (4096, 0)  # the docs folder's block
    assert sorted(os.listdir(env.home("alice"))) == ["docs"]
    assert env.suite.spool_files == []


async def test_errors_are_clear(ssh_factory: SshFactory, tmp_path: Path) -> None:
    env = await ssh_factory(max_upload="1MB")
    await env.enable("alice")
    home = env.home("alice")
    (home / "dir").mkdir()
    (home / "dir" / "f").write_bytes(b"x")
    (home / "big").write_bytes(os.urandom(1_000_001))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    os.symlink(outside, home / "out")
    os.symlink(outside / "secret", home / "secret")
    os.symlink("dir/f", home / "inner")
    os.mkfifo(home / "fifo")
    cases = [
        ("alice", "missing.txt", grpc.StatusCode.NOT_FOUND, "no such file or folder in the home: missing.txt"),
        ("alice", "nope/f", grpc.StatusCode.NOT_FOUND, "no such folder in the home: nope"),
        ("alice", "/etc/passwd", grpc.StatusCode.NOT_FOUND, "no such folder in the home: etc"),
        ("alice", "../bob", grpc.StatusCode.INVALID_ARGUMENT, "must stay inside the home"),
        ("alice", "dir/../../x", grpc.StatusCode.INVALID_ARGUMENT, "'..' is not allowed"),
        ("alice", "", grpc.StatusCode.INVALID_ARGUMENT, "path is empty"),
        ("alice", "out", grpc.StatusCode.PERMISSION_DENIED, "out is a symlink pointing outside the home"),
        ("alice", "out/secret", grpc.StatusCode.PERMISSION_DENIED, "out is a symlink pointing outside the home"),
        ("alice", "secret", grpc.StatusCode.PERMISSION_DENIED, "secret is a symlink pointing outside the home"),
        ("alice", "inner", grpc.StatusCode.INVALID_ARGUMENT, "inner is a symlink; Process takes the file"),
        ("alice", "dir/f/x", grpc.StatusCode.INVALID_ARGUMENT, "dir/f is a file, not a folder"),
        ("alice", "fifo", grpc.StatusCode.INVALID_ARGUMENT, "not a regular file or folder"),
        ("alice", "big", grpc.StatusCode.INVALID_ARGUMENT, "over the upload limit of 1000000 bytes"),
        ("alice", "/", grpc.StatusCode.INVALID_ARGUMENT, "folder / as .tar.gz is over the upload limit"),
        ("bob", "x", grpc.StatusCode.NOT_FOUND, "no SSH account 'bob'"),
        ("Bob", "x", grpc.StatusCode.INVALID_ARGUMENT, "username 'Bob' is not valid"),
    ]
    for user, path, code, needle in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await process(env, path, user=user)
        assert info.value.code() == code, (path, info.value.details())
        assert needle in (info.value.details() or ""), (path, info.value.details())
    assert os.listdir(env.cfg.spool_dir) == [] and pending(env) == []
    assert (outside / "secret").read_text() == "s"


async def test_failed_job_removes_nothing(ssh_factory: SshFactory, redis_server: Any) -> None:
    env = await ssh_factory()  # no ingest workers: this test ends the job itself, as a failing worker would
    await env.enable("alice")
    (env.home("alice") / "keep.txt").write_bytes(b"keep me")
    reply = await process(env, "keep.txt")
    assert pending(env) == [f"{reply.job}.json"]
    redis = connect(redis_server.url)
    try:
        await JobStore(redis).fail(reply.job, "backends unavailable")
    finally:
        await redis.aclose()
    await wait_until_async(lambda: pending(env), "no pending job left", until=lambda p: p == [])
    assert (env.home("alice") / "keep.txt").read_bytes() == b"keep me"


async def test_removal_resumes_after_restart_and_keeps_changes(ssh_factory: SshFactory, redis_server: Any) -> None:
    env = await ssh_factory()
    await env.enable("alice")
    home = env.home("alice")
    (home / "tree" / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        (home / "tree" / name).write_bytes(name.encode())
    (home / "top.txt").write_bytes(b"top")
    folder = await process(env, "tree")
    whole = await process(env, "/")
    assert (whole.path, whole.directory, whole.name) == ("/", True, "alice.tar.gz")
    # after Process: one file rewritten, one added; both must survive the removal
    (home / "tree" / "b").write_bytes(b"rewritten")
    (home / "tree" / "sub" / "new").write_bytes(b"new")
    env = await restart(env)
    assert env.svc.processor.watching == sorted([folder.job, whole.job])
    redis = connect(redis_server.url)
    try:
        store = JobStore(redis)
        await store.done(folder.job, file_id="0" * 56, dedup=False, receipt=b"", size=1)
        await wait_until_async(
            lambda: pending(env), "only the whole-tree job pending", until=lambda p: p == [f"{whole.job}.json"]
        )
        assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == [
            "top.txt",
            "tree",
            "tree/b",
            "tree/sub",
            "tree/sub/new",
        ]
        await store.done(whole.job, file_id="1" * 56, dedup=False, receipt=b"", size=1)
        await wait_until_async(lambda: pending(env), "no pending job left", until=lambda p: p == [])
    finally:
        await redis.aclose()
    # the home itself stays; the entries changed after Process stay too
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == ["tree", "tree/b", "tree/sub", "tree/sub/new"]
    assert home.is_dir() and (home / "tree" / "b").read_bytes() == b"rewritten"


async def test_a_replica_gateway_refuses_process(ssh_factory: SshFactory, tmp_path: Path) -> None:
    """A role: replica gateway shares the master's pool but cannot store a record: Process is refused up front."""
    env = await ssh_factory(role="replica", metadata={"mode": "user", "uri": f"dir://{tmp_path}/replica"})
    await env.enable("alice")
    (env.home("alice") / "photo.jpg").write_bytes(b"jpeg")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await process(env, "photo.jpg")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "read-only replica" in (info.value.details() or "") and "master gateway" in (info.value.details() or "")
    assert (env.home("alice") / "photo.jpg").read_bytes() == b"jpeg"  # nothing queued, nothing removed
    assert os.listdir(env.cfg.spool_dir) == [] and pending(env) == []


async def test_a_folder_deeper_than_recursion_is_stored_and_removed(ssh_factory: SshFactory, tmp_path: Path) -> None:
    """1,000 levels (Python's recursion stops near there): archived whole, then removed whole."""
    env = await ssh_factory(ingest=True)
    assert env.suite is not None
    await env.enable("alice")
    home = env.home("alice")
    (home / "deep").mkdir()
    try:
        fd = deep_folder(home / "deep", 1000)
        bottom = os.open("bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(bottom, b"at the bottom")
        os.close(bottom)
        os.close(fd)
        (home / "deep" / "top.txt").write_bytes(b"on top")
        reply = await process(env, "deep")
        status = await env.suite.wait(reply.job)
        assert status.state == common_pb2.JOB_STATE_DONE, status.error
        data = await env.suite.download(status.file_id)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            files = {m.name: m for m in tar.getmembers() if m.isfile()}
            deepest = "deep/" + "d/" * 1000 + "bottom.txt"
            assert sorted(files) == [deepest, "deep/top.txt"]
            got = tar.extractfile(files[deepest])
            assert got is not None and got.read() == b"at the bottom"
            assert sum(1 for m in tar.getmembers() if m.isdir()) == 1001
        await wait_until_async(lambda: not (home / "deep").exists(), "the stored folder removed, all of it")
        assert list(home.iterdir()) == []
    finally:
        remove_tree(home / "deep")
