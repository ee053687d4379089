"""Let virtme-ng drive QEMU 7.2's C virtiofsd, for the bench's peer figure only.

virtme-ng starts the Rust virtiofsd (``--socket-path S --shared-dir D --cache C
--sandbox none``) and waits for the pid file ``S.pid`` that daemon writes. QEMU up
to 7.2 ships the older C daemon instead: it takes ``-o source=D,cache=C``, writes
no such pid file, and refuses the Rust options, so virtme-ng falls back to 9p,
which Debian's cloud kernels do not have. This script stands in for the Rust
daemon: it translates the options, starts the C daemon, and writes ``S.pid``
once the socket is there.

The C daemon has no read-only mode, and running as root it exports the whole
shared directory writable. virtme-ng mounts the guest's root read-only with
overlays on top; the bench runs ``true`` in it and nothing else.

Run as ``python3 virtiofsd_compat.py C_DAEMON RUST_OPTIONS...``; stdlib only,
since virtme-ng runs it as a program.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

# The Rust daemon's options virtme-ng passes that take a value, and those that do not.
VALUED = ("--socket-path", "--shared-dir", "--cache", "--sandbox")
FLAGS = ("--syslog", "--no-announce-submounts", "--posix-acl", "--readonly")
SOCKET_WAIT = 10.0


@dataclass(frozen=True)
class Translated:
    """The C daemon's command line for one Rust one, and the socket it will listen on."""

    argv: list[str]
    socket: str


def translate(c_daemon: str, rust_args: list[str]) -> Translated:
    """The C daemon's argv for the Rust daemon's ``rust_args``; ValueError for an option it has no match for."""
    values: dict[str, str] = {}
    flags: set[str] = set()
    args = iter(rust_args)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in VALUED:
            values[name] = value if eq else next(args, "")
        elif arg in FLAGS:
            flags.add(arg)
        else:
            raise ValueError(f"virtiofsd_compat: no C virtiofsd option for {arg!r}")
    if not values.get("--socket-path") or not values.get("--shared-dir"):
        raise ValueError("virtiofsd_compat: --socket-path and --shared-dir are needed")
    # --sandbox none has no C equivalent; chroot confines the daemon without the namespaces
    # "namespace" (the C default) needs, which a container may not grant.
    options = [f"source={values['--shared-dir']}", f"cache={values.get('--cache', 'auto')}", "sandbox=chroot"]
    if "--posix-acl" in flags:
        options += ["posix_acl", "xattr"]
    # --syslog is dropped: with it, the C daemon closed QEMU's vhost-user connection at once on a host
    # without a syslog daemon ("vhost_backend_init failed: Protocol error"). Its messages go to
    # stderr, which virtme-ng sends to /dev/null unless --verbose.
    argv = [c_daemon, f"--socket-path={values['--socket-path']}", "-o", ",".join(options)]
    return Translated(argv, values["--socket-path"])


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: virtiofsd_compat.py C_DAEMON [RUST VIRTIOFSD OPTIONS]", file=sys.stderr)
        return 2
    c_daemon, rest = argv[0], argv[1:]
    if rest in (["--version"], ["-V"]):
        return subprocess.call([c_daemon, "--version"])
    if rest in (["--help"], ["-h"]):  # virtme-ng reads this for --readonly, which the C daemon lacks
        print("usage: virtiofsd --socket-path PATH --shared-dir DIR [--cache MODE] [--sandbox none] [--posix-acl]")
        return 0
    try:
        translated = translate(c_daemon, rest)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if os.path.exists(translated.socket):  # virtme-ng's mkstemp left a plain file where the socket goes
        os.unlink(translated.socket)
    daemon = subprocess.Popen(translated.argv)
    ends = time.monotonic() + SOCKET_WAIT
    while not os.path.exists(translated.socket) and daemon.poll() is None and time.monotonic() < ends:
        time.sleep(0.01)
    if daemon.poll() is None and os.path.exists(translated.socket):
        # virtme-ng signals this pid when it is done; the C daemon exits by itself when QEMU disconnects.
        with open(translated.socket + ".pid", "w", encoding="ascii") as pidfile:
            pidfile.write(f"{daemon.pid}\n")
    elif daemon.poll() is None:  # no socket in time: virtme-ng has given up on us, so the daemon goes too
        daemon.terminate()
    return daemon.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
