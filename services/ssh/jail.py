"""Start a program under a seccomp filter whose listener goes back to the ssh service (services/ssh/guard.py).

    python3 -I -S jail.py SOCKET_FD PROGRAM_HEX -- PROGRAM ARGS...

Installs the classic-BPF filter ``PROGRAM_HEX`` with a user-notification
listener (no_new_privs first), sends the listener over the Unix socket
``SOCKET_FD`` (SCM_RIGHTS), closes both and execs ``PROGRAM``. A separate
interpreter (the standard library only) rather than code run between fork and
exec in the service itself: there, gRPC's fork hooks would run in the child.
Exits 125 with a message on stderr when the filter cannot be installed.
"""

import ctypes
import os
import socket
import sys

PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def main(argv: list[str]) -> None:
    if len(argv) < 5 or argv[3] != "--":
        sys.exit("usage: jail.py SOCKET_FD PROGRAM_HEX -- PROGRAM ARGS...")
    sock_fd, program, command = int(argv[1]), bytes.fromhex(argv[2]), argv[4:]
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        sys.stderr.write(f"jail: prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}\n")
        sys.exit(125)
    listener = libc.syscall(
        ctypes.c_long(SYS_SECCOMP[os.uname().machine]),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(SECCOMP_FILTER_FLAG_NEW_LISTENER),
        ctypes.byref(fprog),
    )
    if listener < 0:
        sys.stderr.write(f"jail: seccomp: {os.strerror(ctypes.get_errno())}\n")
        sys.exit(125)
    with socket.socket(fileno=sock_fd) as sock:
        socket.send_fds(sock, [b"L"], [listener])
    os.close(listener)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv)
