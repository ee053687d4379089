"""The typed outcome of one modelled system call, with the rule and kernel function behind it."""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Result:
    """What a syscall returned, and why.

    ``ret`` is the C return value (or a structured value: an address tuple, a
    list of completions, poll revents); ``errno`` is None or an errno *name*;
    ``rule`` explains the outcome and ``kernel_fn`` names the kernel function
    whose behaviour decided it.  ``blocked`` marks a call that would sleep
    forever in a single-threaded run; ``approx`` marks figures the model can
    only estimate; ``signal`` names a signal the kernel would raise (SIGPIPE); ``data`` carries received bytes.
    """

    # The five fields every result has live in slots; the optional four default at class level and
    # reach the instance's __dict__ (made only then) when they differ. Without a __getattr__ hook,
    # reading any field is a plain (specialised) attribute load.
    __slots__ = ("op", "ret", "errno", "rule", "kernel_fn", "__dict__")

    op: str
    ret: Any
    errno: str | None
    rule: str
    kernel_fn: str
    blocked: bool = False
    approx: bool = False
    signal: str | None = None
    data: Any = None  # received bytes, or other by-products that are not the return value

    # A hand-written __init__ (dataclass keeps it) that fills the slots through their descriptors
    # (the frozen class's __setattr__ refuses) and leaves optional fields at their class default:
    # every modelled syscall builds one Result, and the generated frozen __init__ costs several times more.
    def __init__(self, op: str, ret: Any, errno: str | None, rule: str, kernel_fn: str, blocked: bool = False,
                 approx: bool = False, signal: str | None = None, data: Any = None) -> None:
        _SET_OP(self, op)
        _SET_RET(self, ret)
        _SET_ERRNO(self, errno)
        _SET_RULE(self, rule)
        _SET_FN(self, kernel_fn)
        if blocked or approx or signal is not None or data is not None:
            optional = self.__dict__
            if blocked:
                optional["blocked"] = blocked
            if approx:
                optional["approx"] = approx
            if signal is not None:
                optional["signal"] = signal
            if data is not None:
                optional["data"] = data

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle and copy through __init__ (the default would set the frozen fields one by one)."""
        return Result, (self.op, self.ret, self.errno, self.rule, self.kernel_fn, self.blocked, self.approx,
                        self.signal, self.data)

    @property
    def ok(self) -> bool:
        return self.errno is None and not self.blocked

    @property
    def errno_num(self) -> int | None:
        return None if self.errno is None else getattr(_errno, self.errno, None)

    def __str__(self) -> str:
        if self.blocked:
            head = "blocks"
        elif self.errno is not None:
            head = f"-1 {self.errno}"
        else:
            head = repr(self.ret) if not isinstance(self.ret, int) else str(self.ret)
        extra = f" [{self.signal}]" if self.signal else ""
        return f"{head}  ({self.rule}; {self.kernel_fn}){extra}"


# The slots' member descriptors, read from the class's namespace: the same objects as ``Result.op``
# and so on at run time, where a type checker would see the field's declared type instead.
_SLOTS: dict[str, Any] = dict(vars(Result))
_SET_OP = _SLOTS["op"].__set__
_SET_RET = _SLOTS["ret"].__set__
_SET_ERRNO = _SLOTS["errno"].__set__
_SET_RULE = _SLOTS["rule"].__set__
_SET_FN = _SLOTS["kernel_fn"].__set__


def errno_name(number: int) -> str:
    """errno number -> name ('EADDRINUSE'), for comparing with a real kernel's errno."""
    return _errno.errorcode.get(number, str(number))


class SyscallError(Exception):
    """Raised inside the model to fail the current call with an errno; turned into a Result."""

    __slots__ = ("errno", "rule", "kernel_fn", "signal")

    def __init__(self, errno: str, rule: str, kernel_fn: str, signal: str | None = None):
        self.errno = errno
        self.rule = rule
        self.kernel_fn = kernel_fn
        self.signal = signal


def fail(errno: str, rule: str, kernel_fn: str, signal: str | None = None) -> SyscallError:
    """Build the exception for ``raise fail(...)``; keeps call sites short."""
    return SyscallError(errno, rule, kernel_fn, signal)
