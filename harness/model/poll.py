"""poll(2): per-protocol readiness masks (tcp_poll, datagram_poll/udp_poll, unix_poll) and the revents rules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from .constants import (
    POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, POLLPRI, POLLRDHUP, POLLRDNORM, POLLWRBAND, POLLWRNORM,
    TCP_CLOSE, TCP_LISTEN, TCP_SYN_RECV, TCP_SYN_SENT,
)
from .result import Result, fail
from .sock import RCV_SHUTDOWN, SEND_SHUTDOWN, SHUTDOWN_MASK, OpenFile, Sock

if TYPE_CHECKING:
    from .host import Host, Process


def tcp_poll(sk: Sock) -> int:
    """tcp_poll(): listeners report a non-empty accept queue; others HUP/IN/OUT/ERR by state."""
    state = sk.sk_state
    if state == TCP_LISTEN:
        return POLLIN | POLLRDNORM if sk.accept_queue else 0  # inet_csk_listen_poll()
    mask = 0
    if sk.shutdown == SHUTDOWN_MASK or state == TCP_CLOSE:
        mask |= POLLHUP
    if sk.shutdown & RCV_SHUTDOWN:
        mask |= POLLIN | POLLRDNORM | POLLRDHUP
    if state not in (TCP_SYN_SENT, TCP_SYN_RECV):
        # tcp_poll(): an urgent byte at the read point does not count as data (target + 1)
        target = 2 if sk.urg_mark == 0 and not sk.oobinline else 1
        if len(sk.rx) >= target:
            mask |= POLLIN | POLLRDNORM
        if sk.urg_mark is not None and not sk.urg_read:
            mask |= POLLPRI  # tp->urg_data & TCP_URG_VALID
        if sk.shutdown & SEND_SHUTDOWN:
            mask |= POLLOUT | POLLWRNORM
        else:
            queued = len(sk.tx_pending)
            # __sk_stream_is_writeable(): free space at least half of what is queued
            if sk.sndbuf - queued >= queued >> 1 and queued < sk.sndbuf:
                mask |= POLLOUT | POLLWRNORM
    if sk.err or sk.errqueue:
        mask |= POLLERR
    return mask


def datagram_poll(sk: Sock) -> int:
    """datagram_poll() (udp_poll adds nothing the model distinguishes)."""
    mask = 0
    if sk.err or sk.errqueue:
        mask |= POLLERR
    if sk.shutdown & RCV_SHUTDOWN:
        mask |= POLLRDHUP | POLLIN | POLLRDNORM
    if sk.shutdown == SHUTDOWN_MASK:
        mask |= POLLHUP
    if sk.datagrams:
        mask |= POLLIN | POLLRDNORM
    mask |= POLLOUT | POLLWRNORM | POLLWRBAND  # sock_writeable(): datagrams leave at once in the model
    return mask


udp_poll = datagram_poll


def unix_poll(sk: Sock) -> int:
    """unix_poll(): listeners are readable with pending connections and never writable."""
    mask = 0
    if sk.err:
        mask |= POLLERR
    if sk.shutdown == SHUTDOWN_MASK:
        mask |= POLLHUP
    if sk.shutdown & RCV_SHUTDOWN:
        mask |= POLLRDHUP | POLLIN | POLLRDNORM
    if sk.rx or sk.accept_queue:
        mask |= POLLIN | POLLRDNORM
    if sk.sk_state == TCP_CLOSE:
        mask |= POLLHUP
    if sk.sk_state != TCP_LISTEN:
        other = sk.peer
        charged = len(other.rx) if other is not None else 0
        if charged << 2 <= sk.sndbuf:  # unix_writable()
            mask |= POLLOUT | POLLWRNORM | POLLWRBAND
    return mask


def unix_dgram_poll(sk: Sock) -> int:
    """unix_dgram_poll(): unix_writable() counts the sender's unread datagrams, then the peer's queue."""
    mask = datagram_poll(sk)
    if (1 + sk.unix_wmem) << 2 > sk.sndbuf:  # unix_writable(): sk_wmem_alloc (which starts at 1) << 2
        return mask & ~(POLLOUT | POLLWRNORM | POLLWRBAND)  # (measured: fuzz-1-389)
    other = sk.peer
    if other is not None and len(other.datagrams) > sk.host.sysctls.get("net.unix.max_dgram_qlen", 10):
        mask &= ~(POLLOUT | POLLWRNORM | POLLWRBAND)
    return mask


def do_poll(op: str, host: "Host", proc: "Process", args: Mapping[str, Any]) -> Result:
    """do_poll(): revents = mask & (events | POLLERR | POLLHUP); POLLNVAL for closed fds; negative fds skipped."""
    entries = args.get("fds")
    if not isinstance(entries, (list, tuple)):
        raise fail("EFAULT", "fds must be a list of descriptors or (fd, events) pairs", "do_sys_poll")
    default_events = args.get("events", POLLIN | POLLOUT)
    timeout = args.get("timeout", 0)
    pairs = []
    for item in entries:
        fd, events = (item if isinstance(item, (tuple, list)) else (item, default_events))
        if type(fd) is not int or type(events) is not int:
            raise fail("EINVAL", f"poll entry {item!r} is not (int, int)", "do_sys_poll")
        pairs.append((fd, events))

    def scan() -> dict[int, int]:
        revents: dict[int, int] = {}
        for fd, events in pairs:
            if fd < 0:
                revents[fd] = 0
                continue
            entry = proc.fds.get(fd)
            if entry is None:
                revents[fd] = POLLNVAL
                continue
            if not isinstance(entry, OpenFile):
                revents[fd] = (POLLIN | POLLOUT) & events  # a terminal: readable and writable as far as we care
                continue
            sk = entry.sock
            revents[fd] = sk.ops.poll(sk) & (events | POLLERR | POLLHUP)
        return revents

    def count(revents: dict[int, int]) -> int:
        return len(revents) - [*revents.values()].count(0)  # descriptors with any event (a repeated fd once)

    revents = scan()
    ready = count(revents)
    if not ready and isinstance(timeout, int) and timeout < 0:
        return Result(op, None, None, "nothing ready and no timeout: sleeps", "do_poll", blocked=True)
    if not ready and isinstance(timeout, int) and timeout > 0:
        # do_poll() sleeps until an event or the timeout: model time runs its timers meanwhile
        # (a SYN retransmitted into an accept queue that now has room), up to the timeout.
        slept = host.net.sleep_until(lambda: count(scan()) > 0, timeout / 1000)
        revents = scan()
        ready = count(revents)
        return Result(op, revents, None, f"{ready} descriptor(s) ready after {slept:.1f} s of the "
                      f"{timeout} ms timeout", "do_poll")
    return Result(op, revents, None, f"{ready} descriptor(s) ready", "do_poll")
