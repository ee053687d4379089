"""Run a user's command in a guest the way `docker exec` does: argv word for word, stdin forwarded, its status passed on.

`invoke lab.exec NAME -- ARGV...` lands here. invoke itself joins everything
after ``--`` into one string, which the guest's shell would then split again
(``python3 -c 'import os, socket; ...'`` became a syntax error), so the words
are taken from the process's own argv instead.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import termios
import tty
from collections.abc import Sequence

from harness.errors import SocklabError

# socklab's own failures (no lab, VM gone, SSH broke, timeout) exit with this, as ssh(1) does, so
# they never look like the guest command's status. Bad input on the command line stays 2.
OWN_FAILURE = 255

# A lone word with any of these is a shell line: `-- 'ss -tln | grep 7000'` runs through sh -c.
SHELL_SYNTAX = frozenset(" \t\n|&;<>()$`\\\"'*?[]#~{}")


def words_after_dashes(argv: Sequence[str], fallback: str) -> list[str]:
    """The words after the first ``--`` of ``argv``; ``fallback`` (invoke's joined remainder) as one word otherwise."""
    if "--" in argv:
        return list(argv[list(argv).index("--") + 1:])
    return [fallback] if fallback.strip() else []


def guest_command(words: Sequence[str]) -> str | list[str]:
    """What to run in the guest: a lone word with shell syntax is a shell line, anything else an exact argv."""
    if not words:
        raise SocklabError("no command: put it after --, e.g. `invoke lab.exec server -- ss -ltn`")
    if len(words) == 1 and SHELL_SYNTAX.intersection(words[0]):
        return words[0]
    return list(words)


def stdin_fd() -> int | None:
    """Our stdin as a descriptor to forward, or None when there is none to read (closed, or a directory)."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return None
    return None if stat.S_ISDIR(mode) else 0


def run_in_guest(ssh, command: str | list[str], *, timeout: float | None, merge: bool = False,
                 use_tty: bool = False) -> int:
    """Stream ``command``'s output to our stdout/stderr as it comes; return its exit status.

    With ``use_tty`` the guest command gets a pseudo-terminal of our terminal's
    size and our terminal is put in raw mode until it ends (restored on any exit).
    """
    out = sys.stdout.buffer
    err = sys.stderr.buffer

    def write(stream):
        def emit(data: bytes) -> None:
            stream.write(data)
            stream.flush()
        return emit

    sys.stdout.flush()
    sys.stderr.flush()
    source = stdin_fd()
    if not use_tty:
        return ssh.execute(command, timeout=timeout, on_stdout=write(out), on_stderr=write(err),
                           merge=merge, stdin=source)
    if source is None or not os.isatty(source):
        raise SocklabError("--tty needs a terminal on stdin (drop --tty to pipe input into the command)")
    size = shutil.get_terminal_size()
    saved = termios.tcgetattr(source)
    try:
        tty.setraw(source)
        return ssh.execute(command, timeout=timeout, on_stdout=write(out), on_stderr=write(err),
                           stdin=source, pty=(os.environ.get("TERM", "vt100"), size.columns, size.lines))
    finally:
        termios.tcsetattr(source, termios.TCSADRAIN, saved)
