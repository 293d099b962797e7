"""The local launcher (``make up``): default config, refusals with clear messages, children that die and come back."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from services import launcher as L
from services.common import net
from services.common.config import DEFAULT_PORTS, Config, build_config, load_config
from services.common.config_text import default_yaml
from services.common.setting import fields_of
from tests.cli.launcher_proc import Launcher, alive, children_of, write_config
from tests.helpers import wait_until

# -- the default config ---------------------------------------------------------------------------------


def test_the_default_config_is_every_default(tmp_path: Path) -> None:
    text = default_yaml(tmp_path)
    path = tmp_path / "g.yaml"
    path.write_text(text)
    assert load_config(path) == build_config({}, data_dir=tmp_path)
    keys = set(re.findall(r"^([a-z_]+):", text, re.MULTILINE))
    assert keys == {f.key for f in fields_of(Config)}
    assert text.count('"dir://') == 22  # 20 backends + metadata records and index
    assert f"unix://{tmp_path}/redis.sock" in text
    # (tests/common/test_config.py checks that every setting is described in it)


def test_a_data_dir_with_odd_characters_round_trips(tmp_path: Path) -> None:
    odd = tmp_path / 'we"ird: dir #1'
    path = tmp_path / "g.yaml"
    path.write_text(default_yaml(odd))
    assert load_config(path).data_dir == odd


def test_config_is_written_once_and_kept(tmp_path: Path) -> None:
    path, wrote = L.ensure_config(tmp_path, None)
    assert wrote and path == tmp_path / "gridstor.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text(path.read_text() + "# my edit\n")
    edited = path.read_text()
    assert L.ensure_config(tmp_path, None) == (path, False)
    assert path.read_text() == edited
    other = tmp_path / "elsewhere.yaml"
    assert L.ensure_config(tmp_path, str(other)) == (other, False)
    assert not other.exists()


# -- redis ------------------------------------------------------------------------------------------------


def test_redis_plans(tmp_path: Path) -> None:
    unix = L.redis_plan(f"unix://{tmp_path}/redis.sock")
    assert unix.managed and unix.socket == tmp_path / "redis.sock"
    conf = L.redis_conf(unix, tmp_path / "redis")
    lines = ("appendonly yes", "appendfsync always", "port 0", f'unixsocket "{tmp_path}/redis.sock"')
    for line in (*lines, f'dir "{tmp_path}/redis"'):
        assert line in conf.splitlines()
    local = L.redis_plan("redis://:pw@127.0.0.1:6390/0")
    assert local.managed and local.port == 6390 and local.password == "pw"
    conf = L.redis_conf(local, tmp_path)
    assert "port 6390" in conf and "bind 127.0.0.1" in conf and 'requirepass "pw"' in conf
    assert not L.redis_plan("redis://redis.example:6379/0").managed


def test_a_socket_path_too_long_for_the_kernel(tmp_path: Path) -> None:
    with pytest.raises(L.LaunchError) as info:
        L.redis_plan("unix:///" + "d" * 120 + "/redis.sock")
    assert info.value.code == 2 and "unix sockets allow 107" in str(info.value)


# -- refusals ---------------------------------------------------------------------------------------------


def test_one_launcher_per_data_dir(tmp_path: Path) -> None:
    with L.data_dir_lock(tmp_path):
        with pytest.raises(L.LockHeld) as info, L.data_dir_lock(tmp_path):
            pass
        assert f"another launcher (pid {os.getpid()}) is already running on {tmp_path}" in str(info.value)
    with L.data_dir_lock(tmp_path):  # free again once released
        pass


def test_a_taken_port_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "data")
    cfg = load_config(config, data_dir=tmp_path / "data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", cfg.ports["meta"] + cfg.metrics_port_offset))
        taken.listen()
        assert L.main(["--data", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    port = cfg.ports["meta"] + cfg.metrics_port_offset
    assert err.startswith(f"gridstor: port {port} (meta metrics) on 127.0.0.1 is already in use")
    assert str(config) in err


def test_a_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gridstor.yaml").write_text("mode: sideways\n")
    assert L.main(["--data", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err == "gridstor: config: mode: must be one of public, secret, allowlist, got 'sideways'\n"
    )


def test_missing_redis_server_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(tmp_path / "data")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert L.main(["--data", str(tmp_path / "data")]) == 1
    assert "apt-get install redis-server" in capsys.readouterr().err


def test_banner_example(tmp_path: Path) -> None:
    cfg = build_config({}, data_dir=tmp_path)
    text = L.banner(L.Launcher(cfg, tmp_path / "gridstor.yaml", ["auth", "meta", "ingest"], timeout=1, grace=1), True)
    cli = L.cli_command()
    assert cli == "gridstor" or cli.endswith("bin/gridstor")  # on PATH, or the venv's wrapper
    assert f"  {cli} put README.md --wait" in text and f"  {cli} get <id> -o copy" in text
    assert f"grpc 127.0.0.1:{DEFAULT_PORTS['meta']}" in text
    assert f"http://127.0.0.1:{DEFAULT_PORTS['meta'] + 100}/metrics" in text
    secret = build_config({"mode": "secret", "secret": "x" * 20, "ports": {"meta": 9000}}, data_dir=tmp_path)
    text = L.banner(L.Launcher(secret, tmp_path / "g.yaml", ["meta"], timeout=1, grace=1), False)
    assert f"{cli} --config {tmp_path / 'g.yaml'} login --secret-file FILE" in text


# -- children ---------------------------------------------------------------------------------------------


def _pid_of(parent: int, name: str) -> int:
    """The child of ``parent`` running module ``name`` (an argument of its command), or redis-server."""

    def runs(cmd: bytes) -> bool:
        return b"redis-server" in cmd if name == "redis" else name.encode() in cmd.split(b"\0")

    for pid in children_of(parent):
        with contextlib.suppress(OSError):
            if runs(Path(f"/proc/{pid}/cmdline").read_bytes()):
                return pid
    raise AssertionError(f"no {name} process under {parent}")


def _serving(cfg: Config, service: str) -> bool:
    status, _ = net.health_status(net.hostport("127.0.0.1", cfg.ports[service]), timeout=1.0)
    return bool(status == health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.slow
def test_killed_children_are_restarted_and_serve_within_15_s(tmp_path: Path, launched: list[Launcher]) -> None:
    data = tmp_path / "data"
    cfg = load_config(write_config(data), data_dir=data)
    proc = Launcher(data)
    launched.append(proc)
    proc.wait_up()
    plan = L.redis_plan(cfg.redis_url)
    for name in ("meta", "ingest", "redis"):
        module = "redis" if name == "redis" else f"services.{name}"
        victim = _pid_of(proc.proc.pid, module)
        os.kill(victim, signal.SIGKILL)

        def back(name: str = name, module: str = module, victim: int = victim) -> bool:
            if proc.proc.poll() is not None:
                pytest.fail(f"the launcher exited:\n{proc.output()}")  # not an AssertionError: _try lets it through
            restarted = _pid_of(proc.proc.pid, module) != victim
            if name == "redis":  # serving again: it answers, and ingest (which needs it) is SERVING
                return restarted and plan.answers() and _serving(cfg, "ingest")
            return restarted and _serving(cfg, name)

        def probe(back: Callable[[], bool] = back) -> bool:
            return _try(back)

        wait_until(probe, f"{name} restarted and serving", within=15, interval=0.1, detail=proc.output)
        assert f"gridstor: {name} was killed by SIGKILL; restarting it in 0.5 s" in proc.stderr
        assert re.search(rf"gridstor: {name} restarted \(pid \d+\)", proc.stderr)
    log = (data / "logs" / "meta.log").read_text()
    assert "was killed by SIGKILL; the launcher starts it again in 0.5 s" in log
    assert proc.proc.poll() is None
    kids = children_of(proc.proc.pid)
    assert proc.terminate() == 0, proc.stderr
    wait_until(lambda: [p for p in kids if alive(p)], "every child to stop", until=lambda left: left == [], within=10)


def _try(probe: Callable[[], bool]) -> bool:
    """``probe()``, False while what it asks is not there yet (a process just replaced, a port not bound)."""
    try:
        return probe()
    except (AssertionError, OSError):
        return False


@pytest.mark.slow
def test_a_child_that_keeps_dying_stops_everything(tmp_path: Path, launched: list[Launcher]) -> None:
    data = tmp_path / "data"
    config = write_config(data)
    proc = Launcher(data, "--max-restarts", "1")
    launched.append(proc)
    proc.wait_up()
    kids = children_of(proc.proc.pid)
    config.write_text(config.read_text() + "mode: sideways\n")  # every start of a service now fails
    os.kill(_pid_of(proc.proc.pid, "services.meta"), signal.SIGKILL)
    assert proc.wait(60) == 1
    err = proc.stderr
    assert "gridstor: meta was killed by SIGKILL; restarting it in 0.5 s" in err
    assert "gridstor: meta exited with code 2; it died 2 times within 120 s, so the gateway stops." in err
    assert f"Last lines of {data / 'logs' / 'meta.log'}:" in err and "mode: must be one of" in err
    wait_until(
        lambda: [p for p in kids if alive(p)], "every child to be stopped", until=lambda left: left == [], within=10
    )


@pytest.mark.slow
def test_a_service_that_cannot_start_is_named_with_its_log(tmp_path: Path, launched: list[Launcher]) -> None:
    data = tmp_path / "data"
    # A metadata store on a disk that is not mounted. (Shard backends like that no longer stop a start:
    # they are retried on use, so reads work with up to m of them gone.)
    bad = {"uri": "dir:///nonexistent-disk/records", "index_uri": "dir:///nonexistent-disk/index"}
    write_config(data, metadata=bad)
    proc = Launcher(data, "--timeout", "30")
    launched.append(proc)
    assert proc.wait(90) == 1
    err = proc.stderr
    m = re.search(r"gridstor: (\w+) exited with code (\d+) while starting; last lines of (\S+):", err)
    assert m, err
    assert m.group(3) == str(data / "logs" / f"{m.group(1)}.log")
    assert "nonexistent-disk" in err  # the service's own message, from its log
    assert "gridstor is up" not in proc.stdout
