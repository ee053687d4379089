"""socklab's debug log: what each module logs, and how a command line turns it on.

Every module that talks to a process or a guest logs with ``logging.getLogger(__name__)``
(``harness.vm.qemu``, ``harness.guest.ssh``, ``harness.guest.client``, ...) at DEBUG level:

- ``harness.vm.qemu``: each QEMU and qemu-img argv, each QMP command with its reply and time;
- ``harness.guest.ssh``: each SSH connect and every command run in a guest, with exit status,
  bytes of output and time;
- ``harness.guest.client``: each agent request and reply (cut to ``LIMIT`` characters) with
  its round trip.

The library itself configures nothing (a program that imports harness decides what it sees).
The command line does, once, through ``configure``:

- off (the default): nothing of socklab's is shown, and paramiko's and qemu.qmp's own records
  are dropped (a booting guest refuses SSH many times, a wedged monitor is stopped by force:
  socklab's own errors say what matters), so the output is what it always was;
- on (``--debug`` on a task, ``SOCKLAB_DEBUG=1``, or invoke's own ``invoke --debug``): socklab's
  DEBUG records and paramiko's and qemu.qmp's INFO records go to stderr, one line each, with
  the milliseconds since the command started. stdout keeps only the data.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

ENV = "SOCKLAB_DEBUG"
LIMIT = 300
# Loggers of libraries socklab drives, shown (at INFO) only with debug on.
LIBRARIES = ("paramiko", "qemu.qmp")
FORMAT = "%(relativeCreated)8.0f ms %(name)s: %(message)s"
_MARK = "_socklab"


def truncate(text: object, limit: int = LIMIT) -> str:
    """``text`` as one line of at most ``limit`` characters (with how much was left out)."""
    shown = str(text).replace("\n", "\\n")
    if len(shown) <= limit:
        return shown
    return f"{shown[:limit]}… ({len(shown) - limit} more chars)"


def env_debug(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether $SOCKLAB_DEBUG asks for the debug log (set, and not empty, 0, no, false or off)."""
    return environ.get(ENV, "").strip().lower() not in ("", "0", "no", "false", "off")


def enabled() -> bool:
    """Whether the debug log is on in this process (configure(True) ran)."""
    return any(getattr(handler, _MARK, None) == "debug" for handler in logging.getLogger("harness").handlers)


def _ours(kind: str, handler: logging.Handler) -> logging.Handler:
    setattr(handler, _MARK, kind)
    return handler


def configure(debug: bool, stream: TextIO | None = None) -> None:
    """Set up the loggers for a command line; with ``debug`` False, as quiet as socklab always was.

    Idempotent, and turning debug on later (a task's ``--debug``) replaces the quiet setup.
    """
    for name in ("harness", *LIBRARIES):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if getattr(h, _MARK, None)]:
            logger.removeHandler(handler)
    if not debug:
        for name in LIBRARIES:
            library = logging.getLogger(name)
            library.addHandler(_ours("quiet", logging.NullHandler()))
            library.propagate = False
        return
    target = stream if stream is not None else sys.stderr
    for name, level in (("harness", logging.DEBUG), *((library, logging.INFO) for library in LIBRARIES)):
        handler = logging.StreamHandler(target)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger = logging.getLogger(name)
        logger.addHandler(_ours("debug", handler))
        logger.setLevel(level)
        # invoke --debug gives the root logger a handler too: each record is shown once, here.
        logger.propagate = False
