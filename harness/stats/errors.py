"""Errors of the stats collector: each names the VM, the command and, for bad output, the line."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SocklabError


@dataclass(frozen=True)
class Origin:
    """Where a piece of text came from: which VM ran which command."""

    vm: str
    command: str

    def describe(self) -> str:
        return f"{self.vm}: `{self.command}`"


class StatsError(SocklabError):
    """The stats of a VM could not be collected or understood."""


class StatsToolMissing(StatsError):
    """A program the collector runs is not installed in the guest."""


class StatsCommandFailed(StatsError):
    """A command in the guest exited non-zero (its stderr is in the message)."""


class StatsFormatError(StatsError):
    """A tool printed something the parser does not understand; nothing is guessed or skipped."""

    def __init__(self, origin: Origin, line_number: int, line: str, problem: str) -> None:
        self.origin = origin
        self.line_number = line_number
        self.line = line
        self.problem = problem
        shown = line if len(line) <= 300 else line[:300] + f"… ({len(line)} characters)"
        super().__init__(f"{origin.describe()} printed an unexpected line {line_number}: {problem}\n  line: {shown!r}")


class StatsTruncatedError(StatsFormatError):
    """A line stops before the fields every line of that kind has: the output was cut."""

    def __init__(self, origin: Origin, line_number: int, line: str, problem: str) -> None:
        super().__init__(origin, line_number, line, f"line is truncated: {problem}")


class StatsLookupError(StatsError, LookupError):
    """A snapshot has no socket, counter, NIC or sysctl matching what was asked for."""

    def __str__(self) -> str:  # LookupError would quote the message like a key
        return str(self.args[0]) if self.args else ""
