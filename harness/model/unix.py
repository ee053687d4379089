"""AF_UNIX as far as the labs need: path/abstract names, listen/accept/connect, stream and datagram data."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .addr import SOCKADDR_UN_LEN, SUN_PATH_OFFSET, SockAddr
from .constants import (
    AF_UNIX, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_OOB, MSG_PEEK, MSG_TRUNC, SOCK_CLOEXEC, SOCK_DGRAM, SOCK_NONBLOCK, SOCK_SEQPACKET,
    SOCK_STREAM, SS_CONNECTED, TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN,
)
from .kmem import SKB_SHINFO_ALIGNED, alloc_skb_truesize
from .result import Result, fail
from .sock import RCV_SHUTDOWN, SEND_SHUTDOWN, SHUTDOWN_MASK, OpenFile, Sock
from .versions import RULES

if TYPE_CHECKING:
    from .host import Host, Process

PAGE_SIZE = 4096
MAX_SKB_FRAGS = 17
SKB_MAX_ALLOC = 4 * PAGE_SIZE - SKB_SHINFO_ALIGNED  # SKB_MAX_ORDER(0, 2): 16064
LEFTOVER_FILE = "socket file"  # a path whose socket was closed: the inode stays until unlink()


def _validate(sa: SockAddr, fn: str) -> str:
    """unix_validate_addr(): length within sockaddr_un, family AF_UNIX (EINVAL otherwise, not EAFNOSUPPORT)."""
    if sa.addrlen <= SUN_PATH_OFFSET or sa.addrlen > SOCKADDR_UN_LEN:
        raise fail("EINVAL", f"addrlen {sa.addrlen} outside 3..{SOCKADDR_UN_LEN}", fn)
    if sa.family != AF_UNIX:
        raise fail("EINVAL", f"sun_family {sa.family} is not AF_UNIX", fn)
    name = sa.host
    room = sa.addrlen - SUN_PATH_OFFSET
    if name.startswith("@"):
        # An abstract name is all addrlen - 2 bytes of sun_path, NULs past the text included
        # (measured: fuzz-1-193, addrlen 23 reads back with 11 trailing NULs).
        name = "@" + name[1:room]
        return name + "\0" * (room - len(name))
    return name[:room]


def unix_bind(op: str, host: "Host", creds, f: OpenFile, sa: SockAddr) -> Result:
    """unix_bind(): autobind for a bare sun_family, else unix_bind_bsd() or unix_bind_abstract()."""
    sk = f.sock
    if sa.addrlen == SUN_PATH_OFFSET and sa.family == AF_UNIX:
        if sk.unix_path is not None:
            return Result(op, 0, None, "already bound: autobind is a no-op", "unix_autobind")
        name = _autoname(host, sk.type)
        _publish(host, sk, name)
        return Result(op, 0, None, f"autobound to abstract name {name}", "unix_autobind")
    name = _validate(sa, "unix_bind")
    if name.startswith("@"):
        if sk.unix_path is not None:
            raise fail("EINVAL", "socket already bound", "unix_bind_abstract")
        if _key(name, sk.type) in host.unix_names:
            raise fail("EADDRINUSE", f"abstract name {name} in use by a socket of this type", "unix_bind_abstract")
        _publish(host, sk, name)
        return Result(op, 0, None, f"bound to abstract name {name}", "unix_bind_abstract")
    if name in host.unix_names:
        raise fail("EADDRINUSE", f"{name} exists (vfs_mknod gives EEXIST, reported as EADDRINUSE)", "unix_bind_bsd")
    if sk.unix_path is not None:
        raise fail("EINVAL", "socket already bound (the new file is removed again)", "unix_bind_bsd")
    _publish(host, sk, name)
    return Result(op, 0, None, f"bound to {name} (a socket file now exists)", "unix_bind_bsd")


def _autoname(host: "Host", sock_type: int) -> str:
    while True:
        name = f"@{host.rng.getrandbits(20):05x}"
        if _key(name, sock_type) not in host.unix_names:
            return name


def _key(name: str, sock_type: int) -> str:
    """unix_names key: a path is one file for every type; an abstract name is hashed with the socket type
    (unix_abstract_hash), so a stream and a datagram socket can both hold @name."""
    return f"{name}\0{sock_type}" if name.startswith("@") else name


def _publish(host: "Host", sk: Sock, name: str) -> None:
    host.unix_names[_key(name, sk.type)] = sk
    sk.unix_path = name
    sk.bound = True


def unix_listen(op: str, host: "Host", creds, f: OpenFile, backlog: int) -> Result:
    """unix_listen(): stream/seqpacket only, must be bound, CLOSE or LISTEN."""
    sk = f.sock
    if sk.type not in (SOCK_STREAM, SOCK_SEQPACKET):
        raise fail("EOPNOTSUPP", "only stream and seqpacket sockets listen", "unix_listen")
    if sk.unix_path is None:
        raise fail("EINVAL", "no listens on an unbound AF_UNIX socket (no autobind here)", "unix_listen")
    if sk.sk_state not in (TCP_CLOSE, TCP_LISTEN):
        raise fail("EINVAL", "socket is connected", "unix_listen")
    sk.max_ack_backlog = backlog
    if sk.sk_state != TCP_LISTEN:
        sk.accept_queue = deque()
    sk.sk_state = TCP_LISTEN
    return Result(op, 0, None, f"listening on {sk.unix_path}, backlog {backlog} (queue admits {backlog + 1})",
                  "unix_listen")


def _find_other(host: "Host", sk: Sock, name: str, fn: str) -> Sock:
    """unix_find_other(): ENOENT for a missing path, ECONNREFUSED for a dead name, EPROTOTYPE for a type clash."""
    other = host.unix_names.get(_key(name, sk.type))
    if other is None:
        if name.startswith("@"):
            raise fail("ECONNREFUSED", f"no socket bound to abstract name {name}", "unix_find_abstract")
        raise fail("ENOENT", f"{name} does not exist", "unix_find_bsd")
    if not isinstance(other, Sock) or other.orphan:
        raise fail("ECONNREFUSED", f"{name} is a socket file with no socket behind it", "unix_find_bsd")
    if other.type != sk.type:
        if name.startswith("@"):
            # unix_find_abstract(): the abstract hash includes the socket type, so another type's name is
            # simply not found; only path names (unix_find_bsd) report the clash.
            raise fail("ECONNREFUSED", f"no {sk.type} socket bound to abstract name {name}", "unix_find_abstract")
        raise fail("EPROTOTYPE", "socket types differ", fn)
    return other


def unix_stream_connect(op: str, host: "Host", creds, f: OpenFile, sa: SockAddr) -> Result:
    """unix_stream_connect(): find the listener, refuse or wait when its queue is full, else connect at once."""
    sk = f.sock
    name = _validate(sa, "unix_stream_connect")
    other = _find_other(host, sk, name, "unix_stream_connect")
    if other.sk_state != TCP_LISTEN or other.shutdown & RCV_SHUTDOWN:
        raise fail("ECONNREFUSED", f"{name} is not listening", "unix_stream_connect")
    if len(other.accept_queue) > other.max_ack_backlog:
        # unix_recvq_full(): the same '>' as sk_acceptq_is_full, so backlog + 1 fit
        if f.nonblock:
            raise fail("EAGAIN", f"listener queue full ({len(other.accept_queue)} > {other.max_ack_backlog})",
                       "unix_stream_connect")
        return Result(op, None, None, "listener queue full: sleeps in unix_wait_for_peer", "unix_stream_connect",
                      blocked=True)
    if sk.sk_state == TCP_ESTABLISHED:
        raise fail("EISCONN", "already connected", "unix_stream_connect")
    if sk.sk_state != TCP_CLOSE:
        raise fail("EINVAL", "socket is listening", "unix_stream_connect")
    child = Sock(host, host.next_inode(), AF_UNIX, sk.type, 0, other.ops, other.uid)
    child.sndbuf, child.rcvbuf = other.sndbuf, other.rcvbuf
    child.unix_path = other.unix_path
    child.sk_state = TCP_ESTABLISHED
    child.parent = other
    child.peer, sk.peer = sk, child
    other.accept_queue.append(child)
    sk.sk_state = TCP_ESTABLISHED
    sk.ss_state = SS_CONNECTED
    return Result(op, 0, None, f"connected to {name}; queued {len(other.accept_queue)} on the listener "
                  "(AF_UNIX connects immediately, even non-blocking)", "unix_stream_connect")


def unix_accept(op: str, host: "Host", proc: "Process", f: OpenFile, flags: int) -> Result:
    """unix_accept(): EOPNOTSUPP for datagrams, EINVAL unless listening, EAGAIN when empty."""
    sk = f.sock
    if sk.type not in (SOCK_STREAM, SOCK_SEQPACKET):
        raise fail("EOPNOTSUPP", "datagram sockets do not accept", "unix_accept")
    if sk.sk_state != TCP_LISTEN:
        raise fail("EINVAL", "not listening", "unix_accept")
    if not sk.accept_queue:
        if f.nonblock:
            raise fail("EAGAIN", "no pending connection", "unix_accept")
        return Result(op, None, None, "no pending connection: sleeps", "unix_accept", blocked=True)
    child = sk.accept_queue.popleft()
    child.parent = None
    child.ss_state = SS_CONNECTED
    fd = proc.install(OpenFile(child, bool(flags & SOCK_NONBLOCK), bool(flags & SOCK_CLOEXEC)))
    return Result(op, fd, None, f"fd {fd} = socket:[{child.inode}]", "unix_accept")


def unix_getname(op: str, host: "Host", f: OpenFile, peer: bool) -> Result:
    sk = f.sock
    if peer:
        other = sk.peer
        if other is None:
            raise fail("ENOTCONN", "not connected", "unix_getname")
        return Result(op, other.unix_path or None, None, "peer's bound name (None: unnamed, only sun_family)",
                      "unix_getname")
    return Result(op, sk.unix_path or None, None, "bound name (None: unnamed, addrlen is sizeof(sun_family))",
                  "unix_getname")


def unix_shutdown(op: str, host: "Host", f: OpenFile, how: int) -> Result:
    """unix_shutdown(): mark both ends (the peer sees the mirror image)."""
    mask = how + 1
    if mask < 1 or mask > SHUTDOWN_MASK:
        raise fail("EINVAL", f"how {how} is not SHUT_RD, SHUT_WR or SHUT_RDWR", "unix_shutdown")
    sk = f.sock
    sk.shutdown |= mask
    other = sk.peer
    if other is not None and sk.type != SOCK_DGRAM:
        mirrored = (RCV_SHUTDOWN if mask & SEND_SHUTDOWN else 0) | (SEND_SHUTDOWN if mask & RCV_SHUTDOWN else 0)
        other.shutdown |= mirrored
    return Result(op, 0, None, f"sk_shutdown |= {mask}", "unix_shutdown")


def _epipe(flags: int, why: str, fn: str):
    return fail("EPIPE", why, fn, signal=None if flags & MSG_NOSIGNAL else "SIGPIPE")


def unix_stream_sendmsg(op, host, creds, f: OpenFile, payload: bytes, flags: int, dest) -> Result:
    """unix_stream_sendmsg(): connected peer only; EPIPE (+SIGPIPE) when either side shut the pipe."""
    sk = f.sock
    if dest is not None:
        raise fail("EISCONN" if sk.sk_state == TCP_ESTABLISHED else "EOPNOTSUPP",
                   "stream sockets take no destination", "unix_stream_sendmsg")
    other = sk.peer
    if other is None:
        raise fail("ENOTCONN", "not connected", "unix_stream_sendmsg")
    if sk.shutdown & SEND_SHUTDOWN:
        raise _epipe(flags, "send side shut down", "unix_stream_sendmsg")
    if other.orphan or other.shutdown & RCV_SHUTDOWN:
        raise _epipe(flags, "peer closed", "unix_stream_sendmsg")
    size = len(payload)
    room = max(0, sk.sndbuf - len(other.rx))
    if size and room == 0:
        if f.nonblock or flags & MSG_DONTWAIT:
            raise fail("EAGAIN", f"peer has {len(other.rx)} unread bytes charged to sk_sndbuf {sk.sndbuf}",
                       "sock_alloc_send_pskb")
        return Result(op, None, None, "send buffer full: sleeps", "sock_alloc_send_pskb", blocked=True, approx=True)
    taken = min(size, room)
    other.rx += payload[:taken]
    return Result(op, taken, None, f"queued {taken} bytes on the peer", "unix_stream_sendmsg", approx=taken < size)


def unix_stream_recvmsg(op, host, f: OpenFile, length: int, flags: int) -> Result:
    """unix_stream_read_generic(): EINVAL unless connected; data, then sk_err, then EOF, then EAGAIN."""
    sk = f.sock
    if sk.sk_state != TCP_ESTABLISHED:
        if sk.type == SOCK_SEQPACKET:
            raise fail("ENOTCONN", "not connected", "unix_seqpacket_recvmsg")
        raise fail("EINVAL", "not connected", "unix_stream_read_generic")
    if sk.rx:
        count = min(length, len(sk.rx))
        data = bytes(sk.rx[:count])
        if not flags & MSG_PEEK:
            del sk.rx[:count]
        return Result(op, count, None, f"read {count} bytes", "unix_stream_read_generic", data=data)
    error = sk.take_error()
    if error:
        raise fail(error, "peer closed with data unread", "unix_stream_read_generic")
    if sk.shutdown & RCV_SHUTDOWN:
        return Result(op, 0, None, "peer closed or shut down: end of stream", "unix_stream_read_generic")
    if f.nonblock or flags & MSG_DONTWAIT:
        raise fail("EAGAIN", "nothing queued", "unix_stream_read_generic")
    return Result(op, None, None, "nothing queued: sleeps", "unix_stream_data_wait", blocked=True)


def unix_dgram_connect(op, host, creds, f: OpenFile, sa: SockAddr) -> Result:
    sk = f.sock
    if sa.family == 0 and sa.addrlen >= 2:
        sk.peer = None
        return Result(op, 0, None, "AF_UNSPEC: peer removed", "unix_dgram_connect")
    name = _validate(sa, "unix_dgram_connect")
    other = _find_other(host, sk, name, "unix_dgram_connect")
    if other.peer is not None and other.peer is not sk:
        # unix_dgram_connect() asks unix_may_send() too, not only sendmsg: a receiver connected to
        # another socket refuses the connect itself (measured: fuzz-1-873).
        raise fail("EPERM", "the receiver is connected to another socket", "unix_may_send")
    sk.peer = other
    return Result(op, 0, None, f"default destination {name}", "unix_dgram_connect")


def unix_dgram_sendmsg(op, host, creds, f: OpenFile, payload: bytes, flags: int, dest) -> Result:
    """unix_dgram_sendmsg(): MSG_OOB, the address (or a peer), EMSGSIZE past sk_sndbuf - 32, then the lookup;
    EAGAIN past max_dgram_qlen queued datagrams."""
    sk = f.sock
    if flags & MSG_OOB:
        raise fail("EOPNOTSUPP", "datagram sockets have no out-of-band data", "unix_dgram_sendmsg")
    name = _validate(dest, "unix_dgram_sendmsg") if dest is not None else None
    peer_late = RULES["unix_dgram_peer_checked_after_alloc"].value(host.kernel)
    if name is None and sk.peer is None and not peer_late:
        raise fail("ENOTCONN", "no destination and not connected", "unix_dgram_sendmsg")
    if len(payload) > sk.sndbuf - 32:
        raise fail("EMSGSIZE", f"{len(payload)} > sk_sndbuf - 32", "unix_dgram_sendmsg")
    if sk.shutdown & SEND_SHUTDOWN:
        # sock_alloc_send_pskb() comes before the receiver is looked up (no SIGPIPE for datagrams).
        raise fail("EPIPE", "send side shut down", "sock_alloc_send_pskb")
    if sk.unix_wmem >= sk.sndbuf:
        # sock_alloc_send_pskb(): the skbs this socket sent stay charged to it until they are read
        if f.nonblock or flags & MSG_DONTWAIT:
            raise fail("EAGAIN", f"sk_wmem_alloc {sk.unix_wmem} >= sk_sndbuf {sk.sndbuf} (datagrams not yet read)",
                       "sock_alloc_send_pskb")
        return Result(op, None, None, "send buffer full of unread datagrams: sleeps", "sock_alloc_send_pskb",
                      blocked=True)
    if name is None and sk.peer is None:
        raise fail("ENOTCONN", "no destination and not connected (peer looked up after the skb allocation)",
                   "unix_dgram_sendmsg")
    if name is not None:
        other = _find_other(host, sk, name, "unix_dgram_sendmsg")
    else:
        other = sk.peer
        if other.orphan:
            raise fail("ECONNREFUSED", "peer is gone", "unix_dgram_sendmsg")
    if other.type == SOCK_DGRAM and other.peer is not None and other.peer is not sk:
        # unix_may_send(): a receiver connected to another socket takes datagrams from that one only.
        raise fail("EPERM", "the receiver is connected to another socket", "unix_may_send")
    if other.shutdown & RCV_SHUTDOWN:
        raise _epipe(flags, "receiver shut down", "unix_dgram_sendmsg")
    limit = host.sysctls.get("net.unix.max_dgram_qlen", 10)
    if len(other.datagrams) > limit:
        if f.nonblock or flags & MSG_DONTWAIT:
            raise fail("EAGAIN", f"receiver holds {len(other.datagrams)} > max_dgram_qlen {limit}", "unix_dgram_sendmsg")
        return Result(op, None, None, "receiver queue full: sleeps", "unix_wait_for_peer", blocked=True)
    if not other.datagrams:
        other.datagrams = deque()
    truesize = _dgram_truesize(len(payload))
    sk.unix_wmem += truesize  # skb_set_owner_w(): charged to the sender, freed by sock_wfree() when read
    other.datagrams.append((payload, sk.unix_path or "", truesize, sk))
    return Result(op, len(payload), None, f"datagram queued on {other.unix_path or 'peer'}", "unix_dgram_sendmsg")


def _dgram_truesize(length: int) -> int:
    """skb->truesize of unix_dgram_sendmsg()'s skb: linear up to SKB_MAX_ALLOC, the rest in pages."""
    paged = 0
    if length > SKB_MAX_ALLOC:
        paged = min(length - SKB_MAX_ALLOC, MAX_SKB_FRAGS * PAGE_SIZE)
        paged = (paged + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    return alloc_skb_truesize(length - paged) + paged


def unix_dgram_recvmsg(op, host, f: OpenFile, length: int, flags: int) -> Result:
    sk = f.sock
    if sk.datagrams:
        payload, source, truesize, sender = sk.datagrams[0]
        if not flags & MSG_PEEK:
            sk.datagrams.popleft()
            sender.unix_wmem -= truesize
        # __unix_dgram_recvmsg(): with MSG_TRUNC the datagram's whole length, as UDP (measured: fuzz-1-62)
        ret = len(payload) if flags & MSG_TRUNC else min(length, len(payload))
        return Result(op, ret, None, f"datagram from {source!r}", "unix_dgram_recvmsg", data=payload[:length])
    if f.nonblock or flags & MSG_DONTWAIT:
        raise fail("EAGAIN", "nothing queued", "__skb_try_recv_datagram")
    return Result(op, None, None, "nothing queued: sleeps", "__skb_wait_for_more_packets", blocked=True)


def unix_release(host: "Host", sk: Sock) -> str:
    """unix_release_sock(): abstract names vanish, path files stay; peers see EOF or ECONNRESET."""
    sk.orphan = True
    name = sk.unix_path
    if name is not None and host.unix_names.get(_key(name, sk.type)) is sk:
        if name.startswith("@"):
            del host.unix_names[_key(name, sk.type)]
        else:
            host.unix_names[name] = LEFTOVER_FILE
    notes = []
    if sk.sk_state == TCP_LISTEN:
        for embryo in sk.accept_queue:
            client = embryo.peer
            if client is not None:
                client.shutdown = SHUTDOWN_MASK
                client.err = "ECONNRESET"
        notes.append(f"{len(sk.accept_queue)} pending connection(s) reset")
        sk.accept_queue = ()
    for _, _, truesize, sender in sk.datagrams if sk.type == SOCK_DGRAM else ():
        sender.unix_wmem -= truesize  # skb_queue_purge(): each skb's sock_wfree() uncharges its sender
    if sk.type == SOCK_DGRAM:
        sk.datagrams = ()
    other = sk.peer
    if other is not None and sk.type != SOCK_DGRAM:
        other.shutdown = SHUTDOWN_MASK
        if sk.rx:
            other.err = "ECONNRESET"
    sk.sk_state = TCP_CLOSE
    sk.peer = None
    if name is not None and not name.startswith("@"):
        notes.append(f"{name} stays on disk until unlink()")
    return "; ".join(notes) or "released"
