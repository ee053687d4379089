"""setsockopt/getsockopt: sk_setsockopt/sk_getsockopt (SOL_SOCKET), ip_setsockopt, ipv6_setsockopt, TCP bits."""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING, Any, Mapping

from .args import arg_int, c_int
from .config import Creds
from .constants import (
    AF_INET, AF_INET6, CAP_NET_ADMIN, IP_FREEBIND, IP_RECVERR, IP_TOS, IP_TTL, IPPROTO_TCP, IPPROTO_UDP,
    IPV6_FREEBIND, IPV6_RECVERR, IPV6_V6ONLY, SO_ACCEPTCONN, SO_BROADCAST, SO_DEBUG, SO_DOMAIN, SO_DONTROUTE,
    SO_ERROR, SO_KEEPALIVE, SO_LINGER, SO_OOBINLINE, SO_PRIORITY, SO_PROTOCOL, SO_RCVBUF, SO_RCVBUFFORCE,
    SO_REUSEADDR, SO_REUSEPORT, SO_SNDBUF, SO_SNDBUFFORCE, SO_TYPE, SO_ZEROCOPY, SOCK_DGRAM, SOL_IP, SOL_IPV6,
    SOL_SOCKET, SOL_TCP, TCP_CLOSE, TCP_LISTEN, TCP_MAXSEG, TCP_NODELAY, CAP_NET_RAW, SO_BUSY_POLL,
    SO_BUSY_POLL_BUDGET, SO_INCOMING_NAPI_ID, SO_PREFER_BUSY_POLL, TCP_ESTABLISHED,
)
from .kmem import INT_MAX, SOCK_MIN_RCVBUF, SOCK_MIN_SNDBUF, U32_MASK
from .result import Result, fail
from .sock import OpenFile, Sock
from .versions import RULES

if TYPE_CHECKING:
    from .host import Host

_ACCEPTED_FLAGS = {SO_KEEPALIVE, SO_OOBINLINE, SO_DONTROUTE}


def _decode(args: Mapping[str, Any]) -> tuple[int, int]:
    """(val, optlen) the kernel copies in: ints are 4 bytes, bytes are read little-endian."""
    value = args.get("value", args.get("optval", 0))
    optlen = args.get("optlen")
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        length = len(raw) if optlen is None else c_int(optlen, "optlen")
        padded = (raw + b"\0\0\0\0")[:4]
        val = int.from_bytes(padded, "little", signed=True)
        return val, length
    val = c_int(value, "value")
    length = 4 if optlen is None else c_int(optlen, "optlen")
    return val, length


def setsockopt(op: str, host: "Host", creds: Creds, f: OpenFile, args: Mapping[str, Any]) -> Result:
    """__sys_setsockopt(): negative optlen, then SOL_SOCKET to sk_setsockopt, other levels to the protocol."""
    sk = f.sock
    level = arg_int(args, "level")
    optname = arg_int(args, "optname")
    val, optlen = _decode(args)
    if optlen < 0:
        raise fail("EINVAL", "negative optlen", "__sys_setsockopt")
    if level == SOL_SOCKET:
        return _sk_setsockopt(op, host, creds, sk, optname, val, optlen)
    if not sk.ops.sockopt_levels:
        raise fail("EOPNOTSUPP", f"{sk.ops.name} has no setsockopt for level {level}", "__sys_setsockopt")
    return _proto_setsockopt(op, host, creds, sk, level, optname, val, optlen)


def _sk_setsockopt(op, host: "Host", creds: Creds, sk: Sock, optname: int, val: int, optlen: int) -> Result:
    fn = "sk_setsockopt"
    if optlen < 4:
        raise fail("EINVAL", f"optlen {optlen} < sizeof(int)", fn)
    valbool = 1 if val else 0
    sysctls = host.sysctls
    if optname == SO_REUSEADDR:
        sk.reuse = bool(valbool)
        return Result(op, 0, None, f"sk_reuse = {valbool}", fn)
    if optname == SO_REUSEPORT:
        if valbool and sk.family not in (AF_INET, AF_INET6):
            raise fail("EOPNOTSUPP", "SO_REUSEPORT only for inet sockets", fn)
        sk.reuseport = bool(valbool)
        return Result(op, 0, None, f"sk_reuseport = {valbool}", fn)
    if optname in (SO_TYPE, SO_PROTOCOL, SO_DOMAIN, SO_ERROR, SO_ACCEPTCONN):
        raise fail("ENOPROTOOPT", "read-only option", fn)
    if optname == SO_SNDBUF:
        clamped = min(val & U32_MASK, sysctls["net.core.wmem_max"])  # min_t(u32, val, wmem_max)
        return _set_sndbuf(op, sk, val, clamped, f"min_t(u32, {val}, wmem_max {sysctls['net.core.wmem_max']})")
    if optname == SO_SNDBUFFORCE:
        if not creds.capable(CAP_NET_ADMIN):
            raise fail("EPERM", "SO_SNDBUFFORCE needs CAP_NET_ADMIN", fn)
        return _set_sndbuf(op, sk, val, max(val, 0), "FORCE: wmem_max ignored, negative -> 0")
    if optname == SO_RCVBUF:
        clamped = min(val & U32_MASK, sysctls["net.core.rmem_max"])
        return _set_rcvbuf(op, sk, val, clamped, f"min_t(u32, {val}, rmem_max {sysctls['net.core.rmem_max']})")
    if optname == SO_RCVBUFFORCE:
        if not creds.capable(CAP_NET_ADMIN):
            raise fail("EPERM", "SO_RCVBUFFORCE needs CAP_NET_ADMIN", fn)
        return _set_rcvbuf(op, sk, val, max(val, 0), "FORCE: rmem_max ignored, negative -> 0")
    if optname == SO_ZEROCOPY:
        inet = sk.family in (AF_INET, AF_INET6)
        tcp = sk.type == 1 and sk.protocol == IPPROTO_TCP
        udp = sk.type == SOCK_DGRAM and sk.protocol == IPPROTO_UDP
        if not inet or not (tcp or udp):
            raise fail("EOPNOTSUPP", "SO_ZEROCOPY is only for TCP and UDP (and RDS) sockets", fn)
        if val < 0 or val > 1:
            raise fail("EINVAL", f"SO_ZEROCOPY takes 0 or 1, not {val}", fn)
        sk.zerocopy = bool(val)
        return Result(op, 0, None, f"SOCK_ZEROCOPY {'set' if val else 'cleared'}", fn)
    if optname == SO_BUSY_POLL:
        # Raising the busy-poll time was for CAP_NET_ADMIN (6.1); anyone may lower it.
        checked = RULES["so_busy_poll_raise_needs_cap_net_admin"].value(host.kernel)
        if checked and val > sk.ll_usec and not creds.capable(CAP_NET_ADMIN):
            raise fail("EPERM", f"raising sk_ll_usec from {sk.ll_usec} to {val} needs CAP_NET_ADMIN", fn)
        if val < 0:
            raise fail("EINVAL", f"SO_BUSY_POLL takes microseconds >= 0, not {val}", fn)
        sk.ll_usec = val
        return Result(op, 0, None, f"sk_ll_usec = {val}: recv and poll busy-poll the NIC queue for up to {val} us "
                      "before sleeping", fn)
    if optname == SO_PREFER_BUSY_POLL:
        if valbool and not creds.capable(CAP_NET_ADMIN):
            raise fail("EPERM", "SO_PREFER_BUSY_POLL needs CAP_NET_ADMIN", fn)
        sk.prefer_busy_poll = bool(valbool)
        return Result(op, 0, None, f"sk_prefer_busy_poll = {valbool}", fn)
    if optname == SO_BUSY_POLL_BUDGET:
        if val > sk.busy_poll_budget and not creds.capable(CAP_NET_ADMIN):
            raise fail("EPERM", f"raising sk_busy_poll_budget to {val} needs CAP_NET_ADMIN", fn)
        if not 0 <= val <= 0xFFFF:
            raise fail("EINVAL", f"SO_BUSY_POLL_BUDGET takes 0 to 65535, not {val}", fn)
        sk.busy_poll_budget = val
        return Result(op, 0, None, f"sk_busy_poll_budget = {val}", fn)
    if optname == SO_INCOMING_NAPI_ID:
        raise fail("ENOPROTOOPT", "SO_INCOMING_NAPI_ID is read-only", fn)
    if optname == SO_BROADCAST:
        sk.broadcast = bool(valbool)
        return Result(op, 0, None, f"SOCK_BROADCAST = {valbool}", fn)
    if optname == SO_DEBUG:
        if val and not creds.capable(CAP_NET_ADMIN):
            raise fail("EACCES", "SO_DEBUG needs CAP_NET_ADMIN", fn)
        return Result(op, 0, None, "SOCK_DBG updated", fn)
    if optname == SO_PRIORITY:
        if not (0 <= val <= 6 or creds.capable(CAP_NET_RAW) or creds.capable(CAP_NET_ADMIN)):
            raise fail("EPERM", "priority above 6 needs CAP_NET_RAW or CAP_NET_ADMIN", fn)
        return Result(op, 0, None, f"sk_priority = {val}", fn)
    if optname == SO_LINGER:
        if optlen < 8:
            raise fail("EINVAL", "SO_LINGER needs a struct linger", fn)
        return Result(op, 0, None, "linger recorded (not modelled further)", fn)
    if optname == SO_KEEPALIVE:
        sk.keepalive = bool(valbool)
        return Result(op, 0, None, f"SOCK_KEEPOPEN = {valbool}", fn)
    if optname == SO_OOBINLINE:
        sk.oobinline = bool(valbool)
        return Result(op, 0, None, f"SOCK_URGINLINE = {int(sk.oobinline)}: urgent data stays in the stream", fn)
    if optname in _ACCEPTED_FLAGS:
        return Result(op, 0, None, "flag recorded (not modelled further)", fn)
    raise fail("ENOPROTOOPT", f"SOL_SOCKET option {optname} is not modelled", fn)


def _set_sndbuf(op: str, sk: Sock, val: int, clamped: int, how: str) -> Result:
    """set_sndbuf: halve-safe clamp, then double, never below SOCK_MIN_SNDBUF; locks against autotuning."""
    clamped = min(clamped, INT_MAX // 2)
    sk.sndbuf_locked = True
    sk.sndbuf = max(clamped * 2, SOCK_MIN_SNDBUF)
    return Result(op, 0, None, f"sk_sndbuf = max(2 * {clamped}, {SOCK_MIN_SNDBUF}) = {sk.sndbuf} ({how})",
                  "sk_setsockopt")


def _set_rcvbuf(op: str, sk: Sock, val: int, clamped: int, how: str) -> Result:
    """__sock_set_rcvbuf(): same doubling with SOCK_MIN_RCVBUF."""
    clamped = min(clamped, INT_MAX // 2)
    sk.rcvbuf_locked = True
    sk.rcvbuf = max(clamped * 2, SOCK_MIN_RCVBUF)
    return Result(op, 0, None, f"sk_rcvbuf = max(2 * {clamped}, {SOCK_MIN_RCVBUF}) = {sk.rcvbuf} ({how})",
                  "__sock_set_rcvbuf")


def _proto_setsockopt(op, host, creds, sk: Sock, level: int, optname: int, val: int, optlen: int) -> Result:
    if sk.protocol == IPPROTO_TCP and level == SOL_TCP:
        if optlen < 4:
            raise fail("EINVAL", "optlen < sizeof(int)", "do_tcp_setsockopt")
        if optname == TCP_NODELAY:
            sk.nodelay = bool(val)
            return Result(op, 0, None, f"TCP_NODELAY = {int(bool(val))}", "do_tcp_setsockopt")
        if optname == TCP_MAXSEG:
            if val and (val < 88 or val > 65535):
                raise fail("EINVAL", "TCP_MAXSEG outside TCP_MIN_MSS..MAX_TCP_WINDOW", "do_tcp_setsockopt")
            return Result(op, 0, None, "user MSS recorded", "do_tcp_setsockopt")
        raise fail("ENOPROTOOPT", f"TCP option {optname} is not modelled", "do_tcp_setsockopt")
    if level == SOL_IPV6 and sk.family == AF_INET6:
        return _ipv6_setsockopt(op, sk, optname, val, optlen)
    if level != SOL_IP:
        raise fail("ENOPROTOOPT", f"level {level} is not handled by this protocol", "ip_setsockopt")
    if optname == IP_FREEBIND:
        if optlen < 1:
            raise fail("EINVAL", "IP_FREEBIND needs at least one byte", "do_ip_setsockopt")
        sk.freebind = bool(val if optlen >= 4 else val & 0xFF)
        return Result(op, 0, None, f"inet->freebind = {int(sk.freebind)}: bind() may use non-local addresses",
                      "do_ip_setsockopt")
    if optname in (IP_TOS, IP_TTL, IP_RECVERR):
        return Result(op, 0, None, "recorded (not modelled further)", "do_ip_setsockopt")
    raise fail("ENOPROTOOPT", f"IP option {optname} is not modelled", "do_ip_setsockopt")


def _ipv6_setsockopt(op, sk: Sock, optname: int, val: int, optlen: int) -> Result:
    fn = "do_ipv6_setsockopt"
    if optlen < 4:
        raise fail("EINVAL", "optlen < sizeof(int)", fn)
    if optname == IPV6_V6ONLY:
        if sk.bound or sk.sk_state != TCP_CLOSE:
            raise fail("EINVAL", "IPV6_V6ONLY cannot change once the socket is bound", fn)
        sk.v6only = bool(val)
        return Result(op, 0, None, f"sk_ipv6only = {int(bool(val))}", fn)
    if optname == IPV6_FREEBIND:
        sk.freebind = bool(val)
        return Result(op, 0, None, f"freebind = {int(bool(val))}", fn)
    if optname == IPV6_RECVERR:
        return Result(op, 0, None, "recorded (not modelled further)", fn)
    raise fail("ENOPROTOOPT", f"IPv6 option {optname} is not modelled", fn)


# The SOL_SOCKET options sk_getsockopt() reads straight from struct sock (built once, not per call).
_SOL_SOCKET_GETTERS = {
    SO_SNDBUF: lambda sk: sk.sndbuf,
    SO_RCVBUF: lambda sk: sk.rcvbuf,
    SO_REUSEADDR: lambda sk: int(sk.reuse),
    SO_REUSEPORT: lambda sk: int(sk.reuseport),
    SO_TYPE: lambda sk: sk.type,
    SO_PROTOCOL: lambda sk: sk.protocol,
    SO_DOMAIN: lambda sk: sk.family,
    SO_ACCEPTCONN: lambda sk: int(sk.sk_state == TCP_LISTEN),
    SO_ZEROCOPY: lambda sk: int(sk.zerocopy),
    SO_KEEPALIVE: lambda sk: int(sk.keepalive),
    SO_BROADCAST: lambda sk: int(sk.broadcast),
    SO_BUSY_POLL: lambda sk: sk.ll_usec,
    SO_PREFER_BUSY_POLL: lambda sk: int(sk.prefer_busy_poll),
}


def getsockopt(op: str, host: "Host", creds: Creds, f: OpenFile, args: Mapping[str, Any]) -> Result:
    """sk_getsockopt() and the protocol getters; SO_ERROR reads and clears sk_err."""
    sk = f.sock
    level = arg_int(args, "level")
    optname = arg_int(args, "optname")
    optlen = arg_int(args, "optlen", 4)
    if optlen < 0:
        raise fail("EINVAL", "negative optlen", "sk_getsockopt")
    if level == SOL_SOCKET:
        fn = "sk_getsockopt"
        if optname == SO_ERROR:
            error = sk.take_error()
            number = getattr(_errno, error) if error else 0
            return Result(op, number, None, f"sk_err was {error or 0}; reading clears it", fn)
        getter = _SOL_SOCKET_GETTERS.get(optname)
        if getter is not None:
            return Result(op, getter(sk), None, "value read from struct sock", fn)
        if optname == SO_INCOMING_NAPI_ID:
            return _napi_id(op, sk, fn)
        raise fail("ENOPROTOOPT", f"SOL_SOCKET option {optname} cannot be read", fn)
    if not sk.ops.sockopt_levels:
        raise fail("EOPNOTSUPP", f"{sk.ops.name} has no getsockopt for level {level}", "__sys_getsockopt")
    if level == SOL_IP and optname == IP_FREEBIND:
        return Result(op, int(sk.freebind), None, "inet->freebind", "do_ip_getsockopt")
    if level == SOL_IPV6 and sk.family == AF_INET6 and optname == IPV6_V6ONLY:
        return Result(op, int(sk.v6only), None, "sk_ipv6only", "do_ipv6_getsockopt")
    if level == SOL_TCP and sk.protocol == IPPROTO_TCP and optname == TCP_MAXSEG:
        return Result(op, sk.mss_cache or 536, None, "tp->mss_cache (536 before connect)", "do_tcp_getsockopt")
    if level == SOL_TCP and sk.protocol == IPPROTO_TCP and optname == TCP_NODELAY:
        return Result(op, int(sk.nodelay), None, "!!(tp->nonagle & TCP_NAGLE_OFF)", "do_tcp_getsockopt")
    if level == SOL_TCP and sk.protocol == IPPROTO_TCP:
        raise fail("ENOPROTOOPT", f"TCP option {optname} is not modelled", "do_tcp_getsockopt")
    if sk.family == AF_INET6 and level not in (SOL_IP, SOL_IPV6):
        raise fail("ENOPROTOOPT", f"level {level} is neither SOL_IP nor SOL_IPV6", "ipv6_getsockopt")
    if sk.family != AF_INET6 and level != SOL_IP:
        # do_ip_getsockopt(): EOPNOTSUPP here, where ip_setsockopt() says ENOPROTOOPT.
        raise fail("EOPNOTSUPP", f"level {level} is not SOL_IP", "do_ip_getsockopt")
    raise fail("ENOPROTOOPT", f"level {level} option {optname} is not modelled", "ip_getsockopt")


# MIN_NAPI_ID is NR_CPUS + 1 (ids below it are CPU numbers, for XPS); Debian's kernels have NR_CPUS 8192.
MIN_NAPI_ID = 8193


def _napi_id(op: str, sk: Sock, fn: str) -> Result:
    """sk_napi_id: set by sk_mark_napi_id() from the skb of each packet the socket receives (TCP, UDP).

    A packet that came through a NIC's NAPI context carries that context's id (napi_hash_add(): the
    first id is MIN_NAPI_ID, the order of registration decides the rest, which the model does not
    know); loopback's per-CPU backlog NAPI is never hashed, so its packets carry 0.
    """
    peer = getattr(sk, "peer_addr", None)
    if not peer or sk.sk_state != TCP_ESTABLISHED:
        return Result(op, 0, None, "no packet received yet: sk_napi_id is 0", fn)
    host = sk.host
    if peer.startswith("127.") or peer == "::1" or peer in host.addrs4 or peer in host.addrs6:
        return Result(op, 0, None, "received over loopback, whose backlog NAPI has no id: 0", "sk_mark_napi_id")
    return Result(op, MIN_NAPI_ID, None, f"received through the NIC's NAPI context: an id >= MIN_NAPI_ID "
                  f"({MIN_NAPI_ID} = NR_CPUS + 1); which one depends on the order the driver registered its "
                  "queues, so the figure is an estimate", "sk_mark_napi_id", approx=True)
