"""What the ssh service counts and logs about sessions: one place for refusals."""

from __future__ import annotations

import logging

from services.common.metrics import Registry

log = logging.getLogger("services.ssh.audit")


class SshMetrics:
    """The ssh service's metrics."""

    def __init__(self, registry: Registry) -> None:
        self.logins = registry.counter("ssh_logins_total", "SSH logins by result (ok, refused)")
        self.sessions = registry.gauge("ssh_connections", "SSH connections open now")
        self.refused = registry.counter("ssh_refused_total", "Refused requests by kind (escape, shell, forward ...)")
        self.quota = registry.counter("ssh_quota_refusals_total", "Writes refused because a home was full")
        self.bytes_written = registry.counter("ssh_sftp_bytes_written_total", "Bytes written through SFTP and SCP")
        self.bytes_read = registry.counter("ssh_sftp_bytes_read_total", "Bytes read through SFTP and SCP")
        self.rsync = registry.counter("ssh_rsync_sessions_total", "rsync sessions by direction (push, pull)")
        self.processed = registry.counter("ssh_process_total", "Process calls that queued a job, by kind")
        self.removed = registry.counter("ssh_process_removed_total", "Processed paths removed after their job")


def refused(metrics: SshMetrics, kind: str, message: str, **fields: object) -> None:
    """Log and count a refused request (an escape attempt, a shell, a forward ...)."""
    metrics.refused.inc(kind=kind)
    log.warning("refused %s: %s", kind, message, extra={"kind": kind, **fields})
