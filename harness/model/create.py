"""socket(2) family handlers: inet_create, inet6_create, unix_create and the protosw tables they search."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import Creds
from .constants import (
    AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_UNIX, CAP_NET_RAW, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_IP,
    IPPROTO_MAX, IPPROTO_MPTCP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, SOCK_DGRAM, SOCK_PACKET, SOCK_RAW,
    SOCK_SEQPACKET, SOCK_STREAM,
)
from . import proto_ops as P
from .result import fail

if TYPE_CHECKING:
    from .host import Host

# inetsw[type]: (protocol, ops-name, permanent) in list order; protocol 0 is the SOCK_RAW wildcard.
INETSW = {
    SOCK_STREAM: ((IPPROTO_TCP, "tcp"), (IPPROTO_MPTCP, "tcp")),
    SOCK_DGRAM: ((IPPROTO_UDP, "udp"), (IPPROTO_UDPLITE, "udp"), (IPPROTO_ICMP, "ping")),
    SOCK_RAW: ((IPPROTO_IP, "raw"),),
}
INET6SW = {
    SOCK_STREAM: ((IPPROTO_TCP, "tcp"), (IPPROTO_MPTCP, "tcp")),
    SOCK_DGRAM: ((IPPROTO_UDP, "udp"), (IPPROTO_UDPLITE, "udp"), (IPPROTO_ICMPV6, "ping")),
    SOCK_RAW: ((IPPROTO_IP, "raw"),),
}
OPS = {
    (AF_INET, "tcp"): P.INET_STREAM_OPS,
    (AF_INET, "udp"): P.INET_DGRAM_OPS,
    (AF_INET, "ping"): P.INET_SOCKRAW_OPS,
    (AF_INET, "raw"): P.INET_SOCKRAW_OPS,
    (AF_INET6, "tcp"): P.INET6_STREAM_OPS,
    (AF_INET6, "udp"): P.INET6_DGRAM_OPS,
    (AF_INET6, "ping"): P.INET6_SOCKRAW_OPS,
    (AF_INET6, "raw"): P.INET6_SOCKRAW_OPS,
}
NETLINK_MAX_LINKS = 32


def inet_create(host: "Host", creds: Creds, family: int, sock_type: int, protocol: int):
    """inet_create()/inet6_create(): protocol range, the protosw walk, CAP_NET_RAW, ping group range."""
    fn = "inet_create" if family == AF_INET else "inet6_create"
    if protocol < 0 or protocol >= IPPROTO_MAX:
        raise fail("EINVAL", f"protocol {protocol} outside 0..{IPPROTO_MAX - 1}", fn)
    entries = (INETSW if family == AF_INET else INET6SW).get(sock_type, ())
    if not entries:
        raise fail("ESOCKTNOSUPPORT", f"no protocol registered for socket type {sock_type} in this family", fn)
    chosen = None
    for answer_proto, kind in entries:
        if protocol == answer_proto:
            if protocol != IPPROTO_IP:
                chosen = (protocol, kind)
                break
        elif protocol == IPPROTO_IP:
            chosen = (answer_proto, kind)
            break
        elif answer_proto == IPPROTO_IP:
            chosen = (protocol, kind)
            break
    if chosen is None:
        raise fail("EPROTONOSUPPORT", f"protocol {protocol} does not match socket type {sock_type}", fn)
    protocol, kind = chosen
    if sock_type == SOCK_RAW and not creds.capable(CAP_NET_RAW):
        raise fail("EPERM", "SOCK_RAW needs CAP_NET_RAW", fn)
    if kind == "ping":
        low, high = host.sysctls["net.ipv4.ping_group_range"]
        if not low <= creds.gid <= high:
            raise fail("EACCES", f"gid {creds.gid} outside net.ipv4.ping_group_range {low} {high}", "ping_init_sock")
    return OPS[(family, kind)], protocol, kind


def unix_create(sock_type: int, protocol: int):
    """unix_create(): protocol must be 0 or PF_UNIX; SOCK_RAW is quietly turned into SOCK_DGRAM."""
    if protocol and protocol != AF_UNIX:
        raise fail("EPROTONOSUPPORT", f"AF_UNIX takes protocol 0 (or PF_UNIX), not {protocol}", "unix_create")
    if sock_type == SOCK_STREAM:
        return P.UNIX_STREAM_OPS, SOCK_STREAM
    if sock_type in (SOCK_DGRAM, SOCK_RAW):
        return P.UNIX_DGRAM_OPS, SOCK_DGRAM
    if sock_type == SOCK_SEQPACKET:
        return P.UNIX_SEQPACKET_OPS, SOCK_SEQPACKET
    raise fail("ESOCKTNOSUPPORT", f"AF_UNIX has no socket type {sock_type}", "unix_create")


def opaque_create(creds: Creds, family: int, sock_type: int, protocol: int):
    """packet_create()/netlink_create(): only their argument checks are modelled."""
    if family == AF_PACKET:
        if not creds.capable(CAP_NET_RAW):
            raise fail("EPERM", "AF_PACKET needs CAP_NET_RAW", "packet_create")
        if sock_type not in (SOCK_DGRAM, SOCK_RAW, SOCK_PACKET):
            raise fail("ESOCKTNOSUPPORT", "AF_PACKET takes SOCK_DGRAM, SOCK_RAW or SOCK_PACKET", "packet_create")
        return P.OPAQUE_OPS
    if family == AF_NETLINK:
        if sock_type not in (SOCK_RAW, SOCK_DGRAM):
            raise fail("ESOCKTNOSUPPORT", "AF_NETLINK takes SOCK_RAW or SOCK_DGRAM", "netlink_create")
        if protocol < 0 or protocol >= NETLINK_MAX_LINKS:
            raise fail("EPROTONOSUPPORT", f"netlink protocol {protocol} out of range", "netlink_create")
        return P.OPAQUE_OPS
    raise fail("EAFNOSUPPORT", f"address family {family} is not registered (no module provides it)",
               "__sock_create")
