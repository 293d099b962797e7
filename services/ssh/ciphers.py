"""Which ciphers the SSH server offers, fastest first for this CPU.

In SSH the client's order decides: the cipher used is the first of the client's
list that the server offers too (RFC 4253 7.1). OpenSSH clients list
chacha20-poly1305 first, so a server that merely put AES first would still get
chacha20. Where the CPU has AES instructions (x86 ``aes``, arm64 ``aes``) AES is
the cheaper one in asyncssh (AES-GCM and AES-CTR run in OpenSSL with AES-NI;
chacha20-poly1305 takes two passes): per CPU second on a 2-core x86 VM, 4.6 GB
with aes128-gcm, 2.8 GB with aes128-ctr + umac-64-etm, 1.3 GB with chacha20
(``bench/ssh.py`` prints these; docs/ssh.md). So by default (``ssh.ciphers:
[]``) such a server offers only AES (GCM, then CTR, which every SSH client has),
and an OpenSSH client picks aes128-ctr, its first AES cipher; without AES
instructions the server offers chacha20-poly1305 first and AES after it. ``ssh.ciphers`` lists the ciphers
offered, in order, when an operator wants others (e.g. a client that offers only
chacha20-poly1305 gets "no matching cipher found" from an AES-only server).
"""

from __future__ import annotations

from pathlib import Path

from services.common.config import SSH_CIPHERS

CHACHA = "chacha20-poly1305@openssh.com"
AES = tuple(c for c in SSH_CIPHERS if c.startswith("aes"))  # GCM first, then CTR


def cpu_has_aes(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has AES instructions (``flags`` on x86, ``Features`` on arm64 of /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return "aes" in value.split()
    return False


def offered(configured: tuple[str, ...], *, aes: bool | None = None) -> tuple[tuple[str, ...], str]:
    """The ciphers to offer, in order, and why (for the start log)."""
    if configured:
        return configured, "ssh.ciphers"
    if cpu_has_aes() if aes is None else aes:
        return AES, "the CPU has AES instructions: AES only (ssh.ciphers to change)"
    return (CHACHA, *AES), "no AES instructions on this CPU: chacha20-poly1305 first"
