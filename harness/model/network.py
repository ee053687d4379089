"""Several hosts on one lab segment: routing between them, a model clock, and timer-driven events."""

from __future__ import annotations

import heapq
import itertools
import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple

from .addr import ANY4, ANY6, is_loopback4, v4_of_v6
from . import tcp, zerocopy
from .result import fail
from .sock import Device, Sock, TimeWaitSock
from .zerocopy import ZEROCOPY_DEFERRED, ZEROCOPY_IMMEDIATE
from .versions import DEFAULT_KERNEL, DEFAULT_MEMORY_MIB, check_kernel

if TYPE_CHECKING:
    from .host import Host



class Route(NamedTuple):
    """ip_route_connect()/ip_route_output() result: who answers, through which device, from which source.

    A NamedTuple: every connect and datagram send builds one, and a frozen dataclass costs several times more.
    """

    dst_host: "Host | None"
    device: Device
    src: str
    dst: str
    local: bool


class Network:
    """The lab: hosts joined by one segment, plus the model clock and pending kernel timers.

    ``zerocopy`` chooses when MSG_ZEROCOPY completions happen: "immediate" (the data is acked or
    copied before the next step, the common case on a quiet lab) or "deferred" (held in flight until
    :meth:`complete_zerocopy` or :meth:`advance`, to reproduce optmem exhaustion).
    ``tcp_zerocopy_copied_without_sg`` flips the one rule that could not be settled from source: whether
    TCP completions over a NIC without scatter-gather carry SO_EE_CODE_ZEROCOPY_COPIED.
    ``strict`` re-raises internal Python errors instead of turning them into EINVAL results (for tests).
    ``kernel`` is the series every host runs unless ``add_host`` gives one its own (6.1, 6.12, 7.2, or a
    release such as ``6.12.118+deb13-cloud-amd64``); ``memory_mib`` is each VM's RAM, from which the
    kernel sizes tcp_mem and the TCP buffer maxima at boot (see versions.py).
    """

    def __init__(self, zerocopy: str = ZEROCOPY_IMMEDIATE, tcp_zerocopy_copied_without_sg: bool = False,
                 strict: bool = False, seed: int = 6_1, kernel: str = DEFAULT_KERNEL,
                 memory_mib: int = DEFAULT_MEMORY_MIB):
        self.kernel = check_kernel(kernel)
        self.memory_mib = memory_mib
        if zerocopy not in (ZEROCOPY_IMMEDIATE, ZEROCOPY_DEFERRED):
            raise ValueError(f"zerocopy must be {ZEROCOPY_IMMEDIATE!r} or {ZEROCOPY_DEFERRED!r}")
        self.hosts: dict[str, Host] = {}
        self.addr_owner: dict[str, Host] = {}
        self.now = 0.0
        self.zerocopy_mode = zerocopy
        self.tcp_zerocopy_copied_without_sg = tcp_zerocopy_copied_without_sg
        self.strict = strict
        self.seed = seed
        self.syn_sent: set[Sock] = set()
        self.timewaits: set[TimeWaitSock] = set()
        self._timers: list[tuple[float, int, Any]] = []  # heap of (when, seq, owner); stale entries skipped
        self._seq = itertools.count()
        self.zc_waiting: list[tuple[Sock, list[int]]] = []

    def add_host(self, name: str, addrs: Iterable[str] = (), sysctls: Mapping[str, Any] | None = None,
                 sg: bool = True, mtu: int = 1500, kernel_sublevel: int = 158, kernel: str | None = None) -> "Host":
        """Create a host with loopback plus one lab NIC carrying ``addrs`` (on its own ``kernel`` if given)."""
        from .host import Host

        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        host = Host(self, name, list(addrs), sysctls, sg=sg, mtu=mtu, kernel_sublevel=kernel_sublevel,
                    kernel=check_kernel(kernel) if kernel else self.kernel, memory_mib=self.memory_mib)
        for addr in host.addrs4 + host.addrs6:
            if addr in self.addr_owner:
                raise ValueError(f"address {addr} already belongs to {self.addr_owner[addr].name}")
            self.addr_owner[addr] = host
        self.hosts[name] = host
        return host

    def __getitem__(self, name: str) -> "Host":
        return self.hosts[name]

    # -- routing -----------------------------------------------------------------------------

    def route(self, src: "Host", dst: str, ipv6: bool, saddr: str | None = None) -> Route:
        """Pick device and source for dst; ENETUNREACH when src has no way out (ip_route_connect).

        ``saddr`` is the socket's own IPv4 source when it has a specific one: a destination of
        INADDR_ANY then means that address (ip_route_output_key_hash_rcu(): daddr = saddr), and the
        loopback only without one (measured: fuzz-1-488, fuzz-1-823).
        """
        mapped = v4_of_v6(dst) if ipv6 else None
        if mapped is not None:
            ipv6, dst = False, mapped
        if not ipv6:
            if dst == ANY4:
                dst = saddr if saddr and saddr != ANY4 else "127.0.0.1"  # INADDR_ANY reaches the local host
            if is_loopback4(dst):
                return Route(src, src.lo, dst, dst, True)
            if dst in src.addrs4:
                return Route(src, src.lo, dst, dst, True)
            owner = self.addr_owner.get(dst)
            if owner is not None:
                return Route(owner, src.nic, src.addrs4[0], dst, False)
            if src.addrs4:
                return Route(None, src.nic, src.addrs4[0], dst, False)
            raise fail("ENETUNREACH", f"no route to {dst}: host has no IPv4 address off loopback",
                       "ip_route_connect")
        if dst == ANY6:
            dst = "::1"
        if dst == "::1" or dst in src.addrs6:
            return Route(src, src.lo, dst, dst, True)
        owner = self.addr_owner.get(dst)
        if owner is not None and src.addrs6:
            return Route(owner, src.nic, src.addrs6[0], dst, False)
        if src.addrs6:
            return Route(None, src.nic, src.addrs6[0], dst, False)
        raise fail("ENETUNREACH", f"no route to {dst}: host has no IPv6 address off loopback",
                   "ip6_dst_lookup_flow")

    # -- clock and timers --------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Let model time pass: deliver deferred zerocopy completions, retransmit SYNs, expire TIME_WAIT."""
        self.complete_zerocopy()
        target = self.now + max(0.0, float(seconds))
        while True:
            when, owner = self._next_event()
            if when > target:
                break
            self.now = when
            self._fire(owner)
        self.now = target

    def advance_until(self, done: Any, limit: float = 3600.0) -> None:
        """Run timers until done() holds, or none is due within ``limit`` s (``poll`` with a timeout).

        Held zerocopy completions are delivered first, as ``advance`` does: time passes for them too.
        """
        self.complete_zerocopy()
        deadline = self.now + limit
        while not done():
            when, owner = self._next_event()
            if when > deadline:
                return
            self.now = when
            self._fire(owner)

    def sleep_until(self, done: Any, seconds: float) -> float:
        """A call asleep until ``done()`` or ``seconds`` have passed (poll, epoll_wait with a timeout):
        timers run meanwhile; returns the seconds slept."""
        started = self.now
        self.advance_until(done, limit=seconds)
        if not done():
            self.advance(started + seconds - self.now)
        return self.now - started

    def schedule(self, when: float, owner: Any) -> None:
        """Arm a timer for a SYN_SENT socket or a timewait minisock; re-arming just pushes again."""
        heapq.heappush(self._timers, (when, next(self._seq), owner))

    def _next_event(self) -> tuple[float, Any]:
        """Earliest live timer and its owner (left at the heap's top for _fire); entries whose owner
        moved on (or re-armed) are dropped lazily."""
        timers = self._timers
        while timers:
            when, _, owner = timers[0]
            if isinstance(owner, TimeWaitSock):
                if owner in self.timewaits and owner.expires == when:
                    return when, owner
            elif owner in self.syn_sent and owner.syn_next == when:
                return when, owner
            heapq.heappop(timers)
        return math.inf, None

    def _fire(self, owner: Any) -> None:
        """Run the timer _next_event found: TIME_WAIT expiry or a SYN retransmit."""
        heapq.heappop(self._timers)
        if isinstance(owner, TimeWaitSock):
            tcp.timewait_expire(owner)
        else:
            tcp.syn_timer(owner)

    # -- zerocopy ----------------------------------------------------------------------------

    def complete_zerocopy(self, order: str = "fifo") -> int:
        """Deliver held MSG_ZEROCOPY completions, in send order or reversed; returns how many."""
        waiting, self.zc_waiting = self.zc_waiting, []
        if order == "reverse":
            waiting.reverse()
        elif order != "fifo":
            raise ValueError("order must be 'fifo' or 'reverse'")
        for sk, uarg in waiting:
            sk.zc_inflight.remove(uarg)
            zerocopy.complete(sk, uarg)
        return len(waiting)

    def counters(self) -> dict[str, dict[str, int]]:
        return {name: dict(host.counters) for name, host in self.hosts.items()}

