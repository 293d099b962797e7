"""What the launcher prints once everything is up: endpoints, config, TLS, and a first example."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from services.common import tls
from services.common.config import DEFAULT_PORTS
from services.common.net import hostport

if TYPE_CHECKING:
    from services.launcher.supervisor import Launcher


def cli_command() -> str:
    """How to run the CLI from here: ``gridstor`` when on PATH, else the venv's wrapper."""
    wrapper = Path(sys.executable).parent / "gridstor"
    found = shutil.which("gridstor")
    if found and Path(found).resolve() == wrapper.resolve():
        return "gridstor"
    try:
        return str(wrapper.relative_to(Path.cwd()))
    except ValueError:
        return str(wrapper)


def banner(launcher: Launcher, wrote_config: bool) -> str:
    """The endpoints, the config path and a first example."""
    cfg, host, services = launcher.cfg, launcher.host, launcher.services
    lines = ["gridstor is up."]
    width = max(len(s) for s in [*services, "redis"])
    for svc in services:
        grpc_addr = hostport(host, cfg.ports[svc])
        metrics = f"http://{hostport(host, cfg.ports[svc] + cfg.metrics_port_offset)}/metrics"
        lines.append(f"  {svc:<{width}}  grpc {grpc_addr:<21} metrics {metrics}")
    lines.append(f"  {'redis':<{width}}  {launcher.redis.where}")
    edge_tls = cfg.tls.edge
    edge = hostport(host, cfg.envoy_port)
    rest = f"{'https' if edge_tls else 'http'}://{edge}"
    grpc_edge = f"https://{edge}" if edge_tls else edge
    lines.append(f"  {'envoy':<{width}}  REST {rest}/v1  (gRPC clients may use {grpc_edge} too)")
    lines.append(f"config: {launcher.config_path}{'  (written now with the defaults)' if wrote_config else ''}")
    lines.append(f"data:   {launcher.data_dir}  (logs in {launcher.logs})")
    lines.append(f"mode:   {cfg.mode}")
    files = tls.files(cfg)
    cacert = ""
    own_edge = edge_tls and files.edge_cert != files.cert
    if edge_tls or cfg.internal_tls:
        where = [w for w, on in (("envoy", edge_tls and not own_edge), ("services", cfg.internal_tls)) if on]
        if own_edge:
            lines.append(f"tls:    envoy: {files.edge_cert}  (its own certificate, e.g. a public CA's)")
        if where:
            head = "        " if own_edge else "tls:    "
            lines.append(f"{head}CA {files.ca}  ({' and '.join(where)}; clients trust this file)")
        report = launcher.tls_report
        if report is not None and report.names:
            expires = f", until {report.expires:%Y-%m-%d}" if report.expires else ""
            lines.append(f"        certificate for {', '.join(report.names)}{expires}")
        if edge_tls and not own_edge:
            cacert = f" --cacert {files.ca}"
    else:
        lines.append("tls:    off (tls.edge: false): plain HTTP, for local development only")
    default_local = host == "127.0.0.1" and all(cfg.ports[s] == DEFAULT_PORTS[s] for s in services)
    opt = "" if default_local else f" --config {launcher.config_path}"
    cli = cli_command()
    lines.append("try it (in another terminal):")
    if cfg.mode != "public":
        how = "--secret-file FILE" if cfg.mode == "secret" else "--identity NAME --key FILE"
        lines.append(f"  {cli}{opt} login {how}")
    lines.append(f"  {cli}{opt} put README.md --wait        # prints the file id")
    lines.append(f"  {cli}{opt} get <id> -o copy")
    if edge_tls:
        ca_opt = f" --ca {files.ca}" if cacert else ""
        lines.append(f"  {cli} --gateway {grpc_edge}{ca_opt} stat <id>   # through Envoy, over TLS")
    lines.append("or over REST:")
    auth = "" if cfg.mode == "public" else " -H 'authorization: Bearer <token>'"
    lines.append(
        f"  curl{cacert}{auth} --data-binary @README.md '{rest}/v1/files?name=README.md'   # -> {{\"job\": ...}}"
    )
    lines.append(f'  curl{cacert} \'{rest}/v1/jobs/<job>?wait=true\'   # -> {{"result": "<id>.md", ...}}')
    lines.append(f"  curl{cacert} -o copy {rest}/v1/files/<id>   # or open it in a browser")
    lines.append("stop with Ctrl-C.")
    return "\n".join(lines)
