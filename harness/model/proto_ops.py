"""proto_ops tables, as the kernel wires them: inet_stream_ops, inet_dgram_ops, unix_*_ops, sock_no_*."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import inet, poll, raw, tcp, udp, unix
from .result import fail


@dataclass(frozen=True, slots=True)
class ProtoOps:
    """struct proto_ops plus the struct proto name, so results can say which table answered."""

    name: str
    prot: str
    bind: Callable[..., Any]
    connect: Callable[..., Any]
    listen: Callable[..., Any]
    accept: Callable[..., Any]
    getname: Callable[..., Any]
    shutdown: Callable[..., Any]
    sendmsg: Callable[..., Any]
    recvmsg: Callable[..., Any]
    poll: Callable[..., int]
    release: Callable[..., str]  # the rule that closed the socket (sys_close reports it)
    sockopt_levels: bool = True  # False: ops->setsockopt is NULL, non-SOL_SOCKET levels -> EOPNOTSUPP


def sock_no_listen(op, host, creds, f, backlog):
    raise fail("EOPNOTSUPP", f"{f.sock.ops.name}.listen is sock_no_listen: this socket type cannot listen",
               "sock_no_listen")


def sock_no_accept(op, host, creds, f, flags):
    raise fail("EOPNOTSUPP", f"{f.sock.ops.name}.accept is sock_no_accept: nothing to accept on this socket type",
               "sock_no_accept")


INET_STREAM_OPS = ProtoOps(
    "inet_stream_ops", "tcp_prot", inet.inet_bind, inet.inet_stream_connect, inet.inet_listen, inet.inet_accept,
    inet.inet_getname, inet.inet_shutdown, tcp.sendmsg, tcp.recvmsg, poll.tcp_poll,
    tcp.close,
)
INET_DGRAM_OPS = ProtoOps(
    "inet_dgram_ops", "udp_prot", inet.inet_bind, inet.inet_dgram_connect, sock_no_listen, sock_no_accept,
    inet.inet_getname, inet.inet_shutdown, udp.sendmsg, udp.recvmsg, poll.udp_poll,
    inet.udp_release,
)
INET_SOCKRAW_OPS = ProtoOps(
    "inet_sockraw_ops", "raw_prot", raw.raw_bind, inet.inet_dgram_connect, sock_no_listen, sock_no_accept,
    inet.inet_getname, inet.inet_shutdown, raw.raw_sendmsg, raw.raw_recvmsg, poll.datagram_poll,
    raw.raw_release,
)
INET6_STREAM_OPS = ProtoOps(
    "inet6_stream_ops", "tcpv6_prot", inet.inet_bind, inet.inet_stream_connect, inet.inet_listen,
    inet.inet_accept, inet.inet_getname, inet.inet_shutdown, tcp.sendmsg, tcp.recvmsg,
    poll.tcp_poll, tcp.close,
)
INET6_DGRAM_OPS = ProtoOps(
    "inet6_dgram_ops", "udpv6_prot", inet.inet_bind, inet.inet_dgram_connect, sock_no_listen, sock_no_accept,
    inet.inet_getname, inet.inet_shutdown, udp.sendmsg, udp.recvmsg, poll.udp_poll,
    inet.udp_release,
)
INET6_SOCKRAW_OPS = ProtoOps(
    "inet6_sockraw_ops", "rawv6_prot", raw.raw_bind, inet.inet_dgram_connect, sock_no_listen, sock_no_accept,
    inet.inet_getname, inet.inet_shutdown, raw.raw_sendmsg, raw.raw_recvmsg, poll.datagram_poll,
    raw.raw_release,
)
UNIX_STREAM_OPS = ProtoOps(
    "unix_stream_ops", "unix_stream_proto", unix.unix_bind, unix.unix_stream_connect, unix.unix_listen,
    unix.unix_accept, unix.unix_getname, unix.unix_shutdown, unix.unix_stream_sendmsg, unix.unix_stream_recvmsg,
    poll.unix_poll, unix.unix_release, sockopt_levels=False,
)
UNIX_SEQPACKET_OPS = ProtoOps(
    "unix_seqpacket_ops", "unix_stream_proto", unix.unix_bind, unix.unix_stream_connect, unix.unix_listen,
    unix.unix_accept, unix.unix_getname, unix.unix_shutdown, unix.unix_stream_sendmsg, unix.unix_stream_recvmsg,
    poll.unix_poll, unix.unix_release, sockopt_levels=False,
)
UNIX_DGRAM_OPS = ProtoOps(
    "unix_dgram_ops", "unix_dgram_proto", unix.unix_bind, unix.unix_dgram_connect, sock_no_listen, sock_no_accept,
    unix.unix_getname, unix.unix_shutdown, unix.unix_dgram_sendmsg, unix.unix_dgram_recvmsg, poll.unix_dgram_poll,
    unix.unix_release, sockopt_levels=False,
)
OPAQUE_OPS = ProtoOps(
    "opaque_ops", "unmodelled", raw.opaque_unsupported, raw.opaque_unsupported, sock_no_listen, sock_no_accept,
    raw.opaque_getname, raw.opaque_unsupported, raw.opaque_unsupported, raw.opaque_unsupported,
    poll.datagram_poll, raw.raw_release,
)
