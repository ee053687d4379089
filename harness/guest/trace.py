"""The kernel's call graph of a step (function_graph in the guest), drawn as a tree and held against the model's citation.

The guest agent records the graph (``trace_begin`` / ``trace_end``, see
``harness/guest/inside/agent.py`` and docs/tracing.md); this module is the host's
side: the typed tree, its compact and full drawings, and the citation check
that tells a model's ``kernel_fn`` that is on the path from one that is
inlined (absent from ``available_filter_functions``) or simply elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from harness.errors import SocklabError

DEFAULT_DEPTH = 6
MAX_DEPTH = 20  # the agent's TRACE_DEPTH_MAX
COMPACT_DEPTH = 4  # levels the terminal shows; the level below is listed inline
# Model citations that name no kernel function (argument checks done by the model itself).
NOT_A_FUNCTION = frozenset({"", "model"})


class TraceError(SocklabError):
    """A step cannot be traced: bad trace options, or the guest refused (no tracefs, tracer busy, ...)."""


@dataclass(frozen=True)
class TraceOptions:
    """How to trace a step: graph depth, and optionally a kernel function to root the graph at as well."""

    depth: int = DEFAULT_DEPTH
    function: str | None = None

    @classmethod
    def of(cls, value: Any, where: str = "trace") -> "TraceOptions | None":
        """``true`` / ``false`` / ``{depth: N, function: NAME}`` (a scenario's ``trace:`` key) -> options or None."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, Mapping):
            unknown = set(value) - {"depth", "function", "__line__"}
            if unknown:
                raise TraceError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; `trace:` takes depth, function")
            return cls(check_depth(value.get("depth", DEFAULT_DEPTH), where), check_function(value.get("function"), where))
        raise TraceError(f"{where}: `trace:` is true, false or {{depth: N, function: NAME}}, not {value!r}")


def check_depth(depth: Any, where: str = "--depth") -> int:
    if isinstance(depth, str) and depth.strip().isdigit():
        depth = int(depth)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise TraceError(f"{where}: trace depth {depth!r} is out of range: use 1..{MAX_DEPTH}")
    return depth


def check_function(name: Any, where: str = "--function") -> str | None:
    if name is None or name == "":
        return None
    if not isinstance(name, str) or not name.isidentifier():
        raise TraceError(f"{where}: {name!r} is not a kernel function name")
    return name


@dataclass(frozen=True)
class Call:
    """One function in the graph: its depth (0 = the syscall entry), name and time in microseconds."""

    depth: int
    name: str
    duration_us: float | None = None


@dataclass(frozen=True)
class KernelTrace:
    """The calls the kernel made for one step, in order, with which names were asked about and are traceable."""

    calls: tuple[Call, ...]
    depth: int = DEFAULT_DEPTH
    traceable: Mapping[str, bool] = field(default_factory=dict)
    lost: bool = False

    @classmethod
    def of(cls, extra: Mapping[str, Any], traceable: Mapping[str, bool] | None = None) -> "KernelTrace":
        calls = tuple(Call(int(depth), str(name), duration) for depth, name, duration in extra.get("calls") or ())
        return cls(calls, int(extra.get("depth") or DEFAULT_DEPTH), dict(traceable or {}), bool(extra.get("lost")))

    @property
    def names(self) -> set[str]:
        return {call.name for call in self.calls}

    @property
    def roots(self) -> list[str]:
        return [call.name for call in self.calls if call.depth == 0]

    def path_to(self, name: str) -> list[str] | None:
        """The chain of callers down to the first call of ``name`` (None if it is not in the graph)."""
        chain: list[str] = []
        for call in self.calls:
            del chain[call.depth:]
            chain.append(call.name)
            if call.name == name:
                return chain
        return None

    @property
    def reaches_limit(self) -> bool:
        return any(call.depth >= self.depth - 1 for call in self.calls)

    def tree(self, highlight: str | None = None) -> str:
        """Every call, indented, with its time: the Markdown report's full tree."""
        lines = []
        for call in self.calls:
            mark = "  <== model" if call.name == highlight else ""
            time = f"  {call.duration_us:.1f} us" if call.duration_us is not None else ""
            lines.append(f"{'  ' * call.depth}{call.name}{time}{mark}")
        return "\n".join(lines) if lines else "(no calls recorded)"

    def compact(self, highlight: str | None = None, levels: int = COMPACT_DEPTH) -> str:
        """The top ``levels`` levels as a tree, the next level inline after ``→``; the cited path always shown."""
        rows: list[tuple[int, str, list[str]]] = []
        for call in self.calls:
            name = f"[bold]{call.name}[/]" if call.name == highlight else call.name
            if call.depth < levels:
                rows.append((call.depth, name, []))
            elif call.depth == levels and rows:
                rows[-1][2].append(name)
        lines = [f"{'  ' * depth}{name}" + (f" → {', '.join(inline)}" if inline else "") for depth, name, inline in rows]
        path = self.path_to(highlight) if highlight else None
        if path is not None and len(path) > levels + 1:
            lines.append(f"  … {' → '.join(path[:-1])} → [bold]{path[-1]}[/]")
        return "\n".join(lines) if lines else "(no calls recorded)"


@dataclass(frozen=True)
class Citation:
    """Whether the model's ``kernel_fn`` for a step is in the kernel's graph of that step, and if not, why."""

    function: str
    # "on the path", "not traceable", "not on the path", "beyond the depth", "another outcome", "not a function"
    status: str
    path: tuple[str, ...] = ()

    @property
    def model_bug(self) -> bool:
        """Traceable, the graph was complete enough, and still not there: the citation is wrong."""
        return self.status == "not on the path"

    def describe(self) -> str:
        if self.status == "on the path":
            return f"model cites {self.function}: on the path ({' → '.join(self.path)})"
        if self.status == "not traceable":
            return (f"model cites {self.function}: not in the graph because it is inlined or not traceable "
                    "(absent from available_filter_functions)")
        if self.status == "beyond the depth":
            return f"model cites {self.function}: not within the traced depth (trace deeper to tell)"
        if self.status == "another outcome":
            return f"model cites {self.function} for an outcome the kernel did not have: its path is not this one"
        if self.status == "not a function":
            return f"model cites {self.function or 'nothing'}: no kernel function to look for"
        return f"model cites {self.function}: traceable but NOT on the path (a wrong citation in the model)"


def check_citation(trace: KernelTrace, kernel_fn: str, same_outcome: bool = True) -> Citation:
    """Where ``kernel_fn`` stands in ``trace``; a step whose two sides ended differently is not judged."""
    if kernel_fn in NOT_A_FUNCTION:
        return Citation(kernel_fn, "not a function")
    path = trace.path_to(kernel_fn)
    if path is not None:
        return Citation(kernel_fn, "on the path", tuple(path))
    if trace.traceable.get(kernel_fn) is False:
        return Citation(kernel_fn, "not traceable")
    if not same_outcome:
        return Citation(kernel_fn, "another outcome")
    if trace.reaches_limit:
        return Citation(kernel_fn, "beyond the depth")
    return Citation(kernel_fn, "not on the path")


SOCKET_SYSCALLS = frozenset({
    "socket", "socketpair", "bind", "listen", "accept", "accept4", "connect", "shutdown", "getsockname",
    "getpeername", "setsockopt", "getsockopt", "sendto", "sendmsg", "sendmmsg", "recvfrom", "recvmsg", "recvmmsg",
})


def _socket_layer(name: str) -> bool:
    return name.startswith(("sock_", "__sock_", "sk_", "inet", "tcp_", "udp", "unix_", "__sys_"))


@dataclass(frozen=True)
class ProgramTrace:
    """``lab.trace``: a program run in a guest, its exit status and output, and the kernel's graph of its calls."""

    vm: str
    argv: tuple[str, ...]
    status: int | None
    output: str
    trace: KernelTrace
    timed_out: bool = False

    def syscalls(self) -> list[str]:
        return self.trace.roots

    def socket_calls(self) -> KernelTrace:
        """Only the trees about sockets: the socket syscalls, and any other (read, close, ...) that reached one."""
        kept: list[Call] = []
        tree: list[Call] = []

        def flush() -> None:
            if tree and (tree[0].name.split("sys_")[-1] in SOCKET_SYSCALLS
                         or any(_socket_layer(call.name) for call in tree[1:])):
                kept.extend(tree)
            tree.clear()

        for call in self.trace.calls:
            if call.depth == 0:
                flush()
            tree.append(call)
        flush()
        return replace(self.trace, calls=tuple(kept))


def trace_program(lab: Any, vm: str, argv: list[str], options: TraceOptions, timeout: float = 60) -> ProgramTrace:
    """Run ``argv`` on ``vm`` under the root agent's tracer: every socket call of it (and its threads) is graphed."""
    from harness.guest.client import Agent

    if not argv:
        raise TraceError("no program: put it after --, e.g. `invoke lab.trace server -- python3 /tmp/client.py`")
    request: dict[str, Any] = {"argv": list(argv), "depth": options.depth, "timeout": timeout}
    if options.function:
        request["function"] = options.function
    with Agent(lab.ssh(vm), vm, timeout=30) as agent:
        reply = agent.request("trace_program", request, check=False, timeout=timeout + 120)
    if reply.error:
        head, sep, rest = reply.error.partition(": ")
        raise TraceError(f"{vm}: cannot trace {argv[0]}: {rest if sep else reply.error}")
    extra = reply.extra
    return ProgramTrace(vm, tuple(argv), extra.get("status"), str(extra.get("output") or ""),
                        KernelTrace.of(extra), bool(extra.get("timed_out")))
