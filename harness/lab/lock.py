"""File locks that name their holder: who has the lab, running what, since when.

``lab.lock`` is held while a command changes a lab (``up``, ``down``): a second
one is refused at once. ``use.lock`` is held while a command drives a lab's
guests (``lab.check``, ``lab.run``, ``lab.grade``): a second one waits its turn
and says so, because two of them at once would share ports and sockets and
blame the kernel for each other's EADDRINUSE.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.errors import LabError


@contextmanager
def held(path: Path, wait: bool = False, what: str = "changing this lab",
         say: Callable[[str], None] | None = None, poll: float = 0.2) -> Iterator[None]:
    """Hold the lock file ``path``; the holder's pid, command and start time are written into it.

    Without ``wait`` a held lock raises a LabError naming the holder. With it,
    ``say`` gets one "waiting for ..." line and the call blocks until the
    holder lets go (Ctrl-C ends the wait).
    """
    with open(path, "a+") as handle:
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                who, details = holder(path)
                if not wait:
                    raise LabError(f"another socklab command is {what} ({who}){details}; "
                                   "wait for it or stop it") from None
                if not told and say is not None:
                    say(f"waiting for another socklab command ({who}{details}), which is {what}")
                    told = True
                time.sleep(poll)
        handle.seek(0)
        handle.truncate()
        # First line: who (the error quotes it); then what it runs and since when.
        handle.write(f"pid {os.getpid()}\n{time.time():.0f} {command_line()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)


def holder(path: Path) -> tuple[str, str]:
    """``("pid 123", ", running `invoke lab.up` for 3 s")`` from a lock file; ``"another process"`` if unknown."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    who, _, details = text.strip().partition("\n")
    return who or "another process", describe_details(details)


def describe_details(details: str) -> str:
    since, _, command = details.strip().partition(" ")
    try:
        age = max(0.0, time.time() - float(since))
    except ValueError:
        return ""
    return f", running `{command}` for {age:.0f} s" if command else f", for {age:.0f} s"


def command_line() -> str:
    """This process's command, short: ``invoke lab.up`` (``python -m invoke`` included), ``pytest -m vm``."""
    argv = list(sys.argv) or ["python"]
    program = Path(argv[0])
    name = program.parent.name if program.name == "__main__.py" else program.name
    text = " ".join([name or "python", *argv[1:]]).replace("\n", " ")
    return text if len(text) <= 80 else text[:79] + "…"
