"""``gridstor``: argument parsing and the one place where failures become messages and exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import TextIO

from services.cli import admin, commands, ssh
from services.cli.connect import parse_hostport
from services.cli.failures import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, CliFailure
from services.cli.session import Session
from services.common.service_main import positive_seconds

Handler = Callable[[Session, argparse.Namespace], int]

EPILOG = """\
addresses: --gateway [https://]HOST:PORT (all services behind one address, e.g. Envoy), else --config FILE
(a gateway config), else $GRIDSTOR_GATEWAY, $GRIDSTOR_CONFIG, else 127.0.0.1 with the default ports.
TLS: https:// in --gateway, or the config's tls section; the certificate is checked against --ca FILE
(or $GRIDSTOR_CA, else the config's tls.ca, else the system's CAs).
exit codes: 0 ok, 1 the operation failed (not found, job error, gateway unreachable ...), 2 usage error.
GRIDSTOR_DEBUG=1 shows a traceback for failures.

example:
  gridstor put README.md --wait          # prints the file id once stored
  gridstor get <id> -o copy
  gridstor ssh enable alice -i ~/.ssh/id_ed25519 --size 500   # an SFTP/rsync home for that key
"""

_GLOBAL_DEFAULTS = {"gateway": None, "config": None, "ca": None, "token": None, "json": False, "quiet": False}


def _nonneg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of bytes, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {n}")
    return n


def _gateway(text: str) -> str:
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after the command name."""
    p = argparse.ArgumentParser(add_help=False)
    d = _GLOBAL_DEFAULTS if defaults else dict.fromkeys(_GLOBAL_DEFAULTS, argparse.SUPPRESS)
    g = p.add_argument_group("global options")
    g.add_argument(
        "--gateway", type=_gateway, metavar="[https://]HOST:PORT", default=d["gateway"], help="one address for all"
    )
    g.add_argument("--config", metavar="FILE", default=d["config"], help="read host and ports from a gateway config")
    g.add_argument("--ca", metavar="FILE", default=d["ca"], help="CA certificate to verify the gateway's TLS with")
    g.add_argument("--token", metavar="TOKEN", default=d["token"], help="use this token instead of the saved one")
    g.add_argument("--json", action="store_true", default=d["json"], help="machine-readable output (one JSON line)")
    g.add_argument("-q", "--quiet", action="store_true", default=d["quiet"], help="no remarks on stderr")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The full ``gridstor`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="gridstor",
        description="Store and fetch files on a gridstor gateway.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(True)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = [_global_options(False)]

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=common)
        p.set_defaults(handler=handler)
        return p

    p = command("keygen", commands.cmd_keygen, "make an ed25519 key pair for allowlist mode; print the public key")
    p.add_argument("--out", metavar="FILE", help="private key file (default ~/.config/gridstor/id_ed25519)")
    p.add_argument("--force", action="store_true", help="replace an existing key file")

    p = command("login", commands.cmd_login, "get a token (valid one day) and save it for the other commands")
    p.add_argument("--identity", metavar="NAME", help="your name in the gateway's allowlist")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--key", metavar="FILE", help="allowlist mode: your private key (default from keygen)")
    how.add_argument("--secret-file", metavar="FILE", help="secret mode: read the shared secret from FILE (- = stdin)")
    how.add_argument("--secret-env", metavar="VAR", help="secret mode: read the shared secret from $VAR")

    p = command("put", commands.cmd_put, "upload a file; print the job id (or the file id with --wait)")
    p.add_argument("file", metavar="FILE", help="the file to upload (- = stdin)")
    p.add_argument("--wait", action="store_true", help="wait until stored, verify the receipt, print the file id")
    p.add_argument("--timeout", type=positive_seconds, metavar="S", help="with --wait: give up after S seconds")
    p.add_argument("--name", metavar="N", help="file name to store (its extension goes into the id)")
    p.add_argument("--content-type", metavar="T", help="MIME type (default: from the extension)")

    p = command("status", commands.cmd_status, "show where an upload job stands")
    p.add_argument("job", metavar="JOB", help="job id printed by put")
    p.add_argument("--wait", action="store_true", help="wait until the job ends")
    p.add_argument("--timeout", type=positive_seconds, metavar="S", help="with --wait: give up after S seconds")

    p = command("get", commands.cmd_get, "download a file (or a byte range)")
    p.add_argument("id", metavar="ID", help="file id")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (or into a folder); - or omitted = stdout")
    p.add_argument("--offset", type=_nonneg, default=0, metavar="N", help="first byte to fetch (default 0)")
    p.add_argument("--length", type=_nonneg, default=0, metavar="N", help="bytes to fetch (default: to the end)")

    p = command("exists", commands.cmd_exists, "exit 0 if a file is stored (and print its id), 1 if not")
    p.add_argument("id", metavar="ID", help="file id")

    p = command("stat", commands.cmd_stat, "show size, type, date and coding of a file")
    p.add_argument("id", metavar="ID", help="file id")
    admin.add_commands(sub, common)
    ssh.add_commands(sub, common)
    return parser


def _quiet_grpc_logs() -> None:
    # grpc logs a traceback when an upload's reader fails; the CLI reports that failure in one line.
    logger = logging.getLogger("grpc")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run one ``gridstor`` command; the exit code."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    debug = os.environ.get("GRIDSTOR_DEBUG", "") not in ("", "0")
    if not debug:
        _quiet_grpc_logs()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, message printed by argparse)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    session = Session(
        gateway=args.gateway,
        config=args.config,
        ca=args.ca,
        token_override=args.token,
        json=args.json,
        quiet=args.quiet,
        stdout=out,
        stderr=err,
    )
    handler: Handler = args.handler
    try:
        return handler(session, args)
    except CliFailure as exc:
        if debug:
            traceback.print_exc(file=err)
        err.write(f"gridstor: {exc}\n")
        return exc.code
    except KeyboardInterrupt:
        err.write("\ngridstor: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `gridstor get ID | head`): stop quietly, as cat does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:
        if debug:
            traceback.print_exc(file=err)
        err.write(f"gridstor: unexpected error: {type(exc).__name__}: {exc} (GRIDSTOR_DEBUG=1 shows a traceback)\n")
        return EXIT_FAILED
    finally:
        session.close()
