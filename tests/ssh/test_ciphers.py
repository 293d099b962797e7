"""Which cipher a stock OpenSSH client ends up with: AES where the CPU has AES instructions, or what
``ssh.ciphers`` lists (services/ssh/ciphers.py)."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, build_config
from services.ssh.ciphers import AES, CHACHA, cpu_has_aes, offered
from tests.helpers import Result, run_program
from tests.ssh.conftest import SshEnv, SshFactory

X86 = "processor\t: 0\nflags\t\t: fpu vme sse2 ssse3 aes avx2 sha_ni\n"
X86_NO_AES = "processor\t: 0\nflags\t\t: fpu vme sse2 ssse3 avx2\n"
ARM64 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"


def test_cpu_flags_are_read_on_x86_and_arm64() -> None:
    assert cpu_has_aes(X86) and cpu_has_aes(ARM64)
    assert not cpu_has_aes(X86_NO_AES) and not cpu_has_aes("")
    assert not cpu_has_aes("flags\t: vaes_like aesx\n")  # whole words only


def test_offer_follows_the_cpu_unless_configured() -> None:
    assert offered((), aes=True)[0] == AES and CHACHA not in AES
    assert offered((), aes=False)[0] == (CHACHA, *AES)
    assert offered(("aes256-ctr",), aes=True) == (("aes256-ctr",), "ssh.ciphers")


def test_unknown_cipher_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"ssh\.ciphers\[1\].*'arcfour'"):
        build_config({"ssh": {"ciphers": ["aes128-ctr", "arcfour"]}})


async def agree(env: SshEnv, *args: str) -> Result:
    """A stock ``sftp`` session (``pwd``) with the client's debug output, which names the agreed cipher."""
    opts = ["LogLevel=DEBUG1" if o == "LogLevel=ERROR" else o for o in env.opts("alice")]
    return await run_program("sftp", "-P", env.port, *opts, *args, "-b", "-", "alice@127.0.0.1", stdin="pwd\n")


def agreed(result: Result) -> str:
    for line in result.err.splitlines():
        if "kex: client->server cipher:" in line:
            words = line.split()
            return words[words.index("cipher:") + 1]
    raise AssertionError(f"no cipher agreed:\n{result}")


async def test_stock_client_gets_the_fast_cipher_of_this_cpu(ssh_factory: SshFactory) -> None:
    env = await ssh_factory()
    await env.enable("alice", mb=4)
    default = await agree(env)
    assert default.rc == 0, default
    chacha = await agree(env, "-c", CHACHA)
    if cpu_has_aes():
        # OpenSSH lists chacha20 first: offered only AES, it takes its first AES cipher (aes128-ctr)
        assert agreed(default) in AES
        assert chacha.rc != 0 and "no matching cipher found" in chacha.err, chacha
    else:
        assert agreed(default) == CHACHA
        assert chacha.rc == 0, chacha


async def test_configured_ciphers_are_the_only_ones_offered(ssh_factory: SshFactory) -> None:
    env = await ssh_factory(ssh={"ciphers": [CHACHA, "aes256-gcm@openssh.com"]})
    await env.enable("alice", mb=4)
    assert agreed(await agree(env)) == CHACHA
    gcm = await agree(env, "-c", "aes256-gcm@openssh.com")
    assert gcm.rc == 0 and agreed(gcm) == "aes256-gcm@openssh.com"
    ctr = await agree(env, "-c", "aes128-ctr")
    assert ctr.rc != 0 and "no matching cipher found" in ctr.err, ctr
