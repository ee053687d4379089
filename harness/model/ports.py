"""Per-host port tables (the bind hash buckets) and the 6.1 bind-conflict rules for TCP and UDP."""

from __future__ import annotations

import random
from typing import Union

from .addr import ANY4, ANY6, v4_of_v6
from .constants import TCP_LISTEN, TCP_TIME_WAIT
from .sock import Sock, TimeWaitSock

Owner = Union[Sock, TimeWaitSock]
LOOPBACK4_IPV6 = "127.0.0.6"  # sk_rcv_saddr of a v6 socket bound to a non-mapped address


def v4_rcv_saddr(sk: Owner) -> str:
    """sk->sk_rcv_saddr: the IPv4 view of the bound address (v6 sockets included)."""
    if not sk.is_v6:
        return sk.rcv_addr or ANY4
    addr = sk.rcv_addr or ANY6
    if addr == ANY6:
        return ANY4
    mapped = v4_of_v6(addr)
    return mapped if mapped is not None else LOOPBACK4_IPV6


def _v6_type(addr: str | None) -> str:
    if addr is None:
        return "mapped"
    if addr == ANY6:
        return "any"
    return "mapped" if v4_of_v6(addr) is not None else "unicast"


def rcv_saddr_equal(sk: Owner, sk2: Owner) -> bool:
    """inet_rcv_saddr_equal(sk, sk2, match_wildcard=true): do the two bound addresses overlap?"""
    if sk.is_v6:
        a6 = sk.rcv_addr or ANY6
        b6 = (sk2.rcv_addr or ANY6) if sk2.is_v6 else None
        t1, t2 = _v6_type(a6), _v6_type(b6)
        if t1 == "mapped" and t2 == "mapped":
            if sk2.v6only:
                return False
            a4, b4 = v4_rcv_saddr(sk), v4_rcv_saddr(sk2)
            return a4 == b4 or a4 == ANY4 or b4 == ANY4
        if t1 == "any" and t2 == "any":
            return True
        if t2 == "any" and not (sk2.v6only and t1 == "mapped"):
            return True
        if t1 == "any" and not (sk.v6only and t2 == "mapped"):
            return True
        return b6 is not None and a6 == b6
    if sk2.is_v6 and sk2.v6only:
        return False
    a4, b4 = v4_rcv_saddr(sk), v4_rcv_saddr(sk2)
    return a4 == b4 or a4 == ANY4 or b4 == ANY4


def tcp_pair_conflict(sk: Sock, sk2: Owner) -> tuple[bool, str]:
    """inet_bind_conflict() with relax=true, reuseport_ok=true, as inet_csk_get_port() calls it."""
    if sk.reuse and sk2.reuse and sk2.sk_state != TCP_LISTEN:
        return False, "SO_REUSEADDR on both and the owner is not listening"
    if sk.reuseport and sk2.reuseport and (sk2.sk_state == TCP_TIME_WAIT or sk.uid == sk2.uid):
        why = "owner in TIME_WAIT" if sk2.sk_state == TCP_TIME_WAIT else f"same uid {sk.uid}"
        return False, f"SO_REUSEPORT on both ({why})"
    if sk.reuse and sk2.reuse:
        return True, "SO_REUSEADDR on both, but the owner is listening"
    if sk.reuseport and sk2.reuseport:
        return True, f"SO_REUSEPORT on both but uids differ ({sk.uid} vs {sk2.uid})"
    if sk2.sk_state == TCP_TIME_WAIT:
        return True, "owner is a TIME_WAIT socket and SO_REUSEADDR is not set on both"
    return True, "without SO_REUSEADDR on both (or SO_REUSEPORT on both with the same uid)"


def udp_pair_conflict(sk: Sock, sk2: Owner) -> tuple[bool, str]:
    """udp_lib_lport_inuse(): shared unless one side lacks SO_REUSEADDR and SO_REUSEPORT does not apply."""
    if sk.reuse and sk2.reuse:
        return False, "SO_REUSEADDR on both"
    if sk.reuseport and sk2.reuseport and sk.uid == sk2.uid:
        return False, f"SO_REUSEPORT on both (same uid {sk.uid})"
    if sk.reuseport and sk2.reuseport:
        return True, f"SO_REUSEPORT on both but uids differ ({sk.uid} vs {sk2.uid})"
    return True, "without SO_REUSEADDR or SO_REUSEPORT on both"


class PortTable:
    """bhash for one protocol on one host: port -> sockets (and TIME_WAIT minisocks) bound to it."""

    __slots__ = ("buckets", "udp")

    def __init__(self, udp: bool):
        self.buckets: dict[int, list[Owner]] = {}
        self.udp = udp

    def owners(self, port: int) -> list[Owner]:
        return self.buckets.get(port, [])

    def add(self, owner: Owner, port: int) -> None:
        self.buckets.setdefault(port, []).append(owner)

    def remove(self, owner: Owner, port: int) -> None:
        bucket = self.buckets.get(port)
        if bucket is None:
            return
        try:
            bucket.remove(owner)
        except ValueError:
            return
        if not bucket:
            del self.buckets[port]

    def find_conflict(self, sk: Sock, port: int) -> tuple[Owner | None, str]:
        """First owner that blocks sk from port, with the reason; (None, reason) when it may share."""
        reason = "port free"
        pair = udp_pair_conflict if self.udp else tcp_pair_conflict
        for sk2 in self.buckets.get(port, ()):
            if sk2 is sk or not rcv_saddr_equal(sk, sk2):
                continue
            conflict, reason = pair(sk, sk2)
            if conflict:
                return sk2, reason
        return None, reason

    def overlapping(self, sk: Sock, port: int) -> bool:
        """Strict check used when picking an ephemeral port: any owner whose address overlaps."""
        return any(sk2 is not sk and rcv_saddr_equal(sk, sk2) for sk2 in self.buckets.get(port, ()))

    def pick_ephemeral(self, sk: Sock, low: int, high: int, rng: random.Random, parity: int | None) -> int:
        """inet_csk_find_open_port / __inet_hash_connect / udp_lib_get_port, deterministic via rng.

        parity 1: bind()/listen() autobind (odd offsets first); parity 0: connect() (even first);
        None: UDP, any port.  SO_REUSEADDR sockets try the lower half first, as the kernel does.
        Returns 0 when the range is exhausted.
        """
        buckets = self.buckets
        top = high + 1
        if parity == 1 and sk.reuse and top - low >= 4:
            half = low + (((top - low) >> 2) << 1)
            halves: tuple[tuple[int, int], ...] = ((low, half), (half, top))
        else:
            halves = ((low, top),)
        orders = (None,) if parity is None else (parity, 1 - parity)
        for lo, hi in halves:
            span = hi - lo
            if span <= 0:
                continue
            start = rng.getrandbits(32) % span
            for order in orders:
                if order is None:
                    first, stride, count = 0, 1, span
                else:
                    first, stride, count = order, 2, (span - order + 1) // 2
                if count <= 0:
                    continue
                begin = (start // stride) % count
                for k in range(count):
                    port = lo + first + stride * ((begin + k) % count)
                    if not buckets.get(port) or not self.overlapping(sk, port):
                        return port
        return 0
