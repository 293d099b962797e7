"""The whole gateway on one machine (``make up``): ``python -m services.launcher --data DIR [--config FILE]``.

On first start it writes a commented default config to ``DIR/gridstor.yaml`` (every
setting with its default and what it means; 20 dir backends under ``DIR/backends``, public
mode on 127.0.0.1); starting again keeps the config and every stored file. Unless the
config turns TLS off, it makes a local CA and the gateway's certificate in ``DIR/tls`` on
first start (services/common/tls.py; re-issued when it nears expiry or a name is added) and
prints the CA's path and a curl example that trusts it. It starts Debian's ``redis-server``
(append-only, unix socket, data in ``DIR/redis``), then each service as its own process
(auth, meta, ingest, ssh, maint), waits until every one answers the gRPC health check,
starts Envoy, prints the endpoints, and stops all of it on Ctrl-C or SIGTERM. Logs go to
``DIR/logs/<name>.log``. A child that dies (redis-server included) is started again after
a backoff; one that dies more than ``--max-restarts`` times within ``--restart-window``
seconds stops everything, with the last lines of its log (docs/resilience.md).

Exit codes: 0 after a requested stop, 1 when something failed to start or a child kept
dying, 2 for a bad config or bad arguments.

The modules: ``cli`` (arguments, the start sequence), ``config_file`` (the default
config), ``checks`` (data dir lock, free ports), ``redis_server``, ``children`` (one
child process), ``supervisor`` (the Launcher: start, health-wait, watch, stop),
``banner``, ``net`` (is a port free), ``errors``; dialling and the health probe are services/common/net.py.
"""

from __future__ import annotations

from services.launcher.banner import banner, cli_command
from services.launcher.checks import LockHeld, check_ports, data_dir_lock
from services.launcher.cli import main
from services.launcher.config_file import CONFIG_NAME, ensure_config
from services.launcher.errors import LaunchError, Stop
from services.launcher.redis_server import RedisPlan, redis_conf, redis_plan
from services.launcher.supervisor import START_ORDER, Launcher

__all__ = [
    "CONFIG_NAME",
    "START_ORDER",
    "LaunchError",
    "Launcher",
    "LockHeld",
    "RedisPlan",
    "Stop",
    "banner",
    "check_ports",
    "cli_command",
    "data_dir_lock",
    "ensure_config",
    "main",
    "redis_conf",
    "redis_plan",
]
