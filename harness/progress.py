"""Progress for long work: one line per step with its time, a live status while it runs."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from rich.console import Console

# Without a terminal (a pipe, a CI log) rich would assume 80 columns and fold every wide table;
# COLUMNS still wins when set.
PIPE_WIDTH = 200


def _width(stream) -> int | None:
    if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()):
        return None  # rich reads COLUMNS or the terminal's own size
    return PIPE_WIDTH


# Progress and errors go to stderr; data (tables, reports, JSON) to stdout, so `| grep` sees it.
console = Console(stderr=True, highlight=False, width=_width(sys.stderr))
out = Console(highlight=False, width=_width(sys.stdout))


class Stage:
    """A running step; ``update`` changes the status text shown beside the spinner."""

    def __init__(self, status) -> None:
        self._status = status
        self.started = time.monotonic()

    def update(self, text: str) -> None:
        if self._status is not None:
            self._status.update(text)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


@contextmanager
def step(title: str, quiet: bool = False) -> Iterator[Stage]:
    """Show ``title`` with a spinner while the block runs, then ``✓ title  12.3 s`` (or ``✗``).

    Without a terminal (CI logs) the spinner is left out; the result lines stay.
    """
    live = console.is_terminal and not quiet
    with console.status(title) if live else nullcontext() as status:
        current = Stage(status)
        try:
            yield current
        except BaseException:
            console.print(f"[red]✗[/] {title}  {current.elapsed:.1f} s")
            raise
    console.print(f"[green]✓[/] {title}  {current.elapsed:.1f} s")


def say(text: str) -> None:
    console.print(text)


def show(renderable) -> None:
    """Data for the user (a table, a verdict): stdout."""
    out.print(renderable)
