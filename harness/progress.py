"""Progress for long work: one line per step with its time, a live status while it runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from rich.console import Console

console = Console(stderr=True, highlight=False)


class Step:
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
def step(title: str, quiet: bool = False) -> Iterator[Step]:
    """Show ``title`` with a spinner while the block runs, then ``✓ title  12.3 s`` (or ``✗``).

    Without a terminal (CI logs) the spinner is left out; the result lines stay.
    """
    live = console.is_terminal and not quiet
    with console.status(title) if live else nullcontext() as status:
        current = Step(status)
        try:
            yield current
        except BaseException:
            console.print(f"[red]✗[/] {title}  {current.elapsed:.1f} s")
            raise
    console.print(f"[green]✓[/] {title}  {current.elapsed:.1f} s")


def say(text: str) -> None:
    console.print(text)
