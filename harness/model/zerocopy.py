"""MSG_ZEROCOPY: notification allocation against optmem_max, completion, coalescing, error-queue reads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .constants import MSG_ZEROCOPY, SO_EE_CODE_ZEROCOPY_COPIED, SO_EE_ORIGIN_ZEROCOPY
from .kmem import ZC_NOTIFY_CHECK
from .versions import RULES
from .result import fail
from .sock import Sock

if TYPE_CHECKING:
    from .host import Host

U32 = 1 << 32
USHRT_MAX = 0xFFFF
UARG_BYTE_LIMIT = 1 << 19  # msg_zerocopy_realloc(): "limit to a few TSO"
ZEROCOPY_IMMEDIATE = "immediate"
ZEROCOPY_DEFERRED = "deferred"


def wants_zerocopy(sk: Sock, flags: int, length: int) -> bool:
    """tcp_sendmsg_locked / __ip_append_data: MSG_ZEROCOPY counts only with SO_ZEROCOPY set and data to send."""
    return bool(flags & MSG_ZEROCOPY) and length > 0 and sk.zerocopy


def realloc_notification(host: "Host", sk: Sock, size: int) -> tuple[list[int], bool]:
    """msg_zerocopy_realloc() for TCP: (uarg, extended).

    While the write queue's tail still holds unsent data of an earlier MSG_ZEROCOPY send
    (``skb_zcopy(tcp_write_queue_tail(sk))``), a send whose id follows that uarg's range joins it:
    ``uarg->len++``, no new notification, no option memory. Past USHRT_MAX - 1 ids or 512 KiB the
    stream gets a new uarg. Anything else allocates (and may hit ENOBUFS).
    """
    tail = sk.zc_tail
    if tail is not None and sk.tx_pending:
        lo, length, _zc_ok, bytelen = tail
        if length < USHRT_MAX - 1 and bytelen + size <= UARG_BYTE_LIMIT and (lo + length) % U32 == sk.zckey:
            tail[1] += 1
            tail[3] = bytelen + size
            sk.zckey = (sk.zckey + 1) % U32
            return tail, True
    return alloc_notification(host, sk, size), False


def _notify_truesize(sk: Sock) -> int:
    """What a notification skb charges to sk_omem_alloc on this socket's kernel (a version rule)."""
    return RULES["zerocopy_notification_truesize"].value(sk.host.kernel)


def alloc_notification(host: "Host", sk: Sock, size: int = 0) -> list[int]:
    """msg_zerocopy_alloc() -> sock_omalloc(sk, 0): ENOBUFS once option memory would pass optmem_max."""
    optmem_max = host.sysctls["net.core.optmem_max"]
    if sk.omem + ZC_NOTIFY_CHECK > optmem_max:
        raise fail(
            "ENOBUFS",
            f"zerocopy notification skb refused: sk_omem_alloc {sk.omem} + SKB_TRUESIZE(0) {ZC_NOTIFY_CHECK}"
            f" > optmem_max {optmem_max} ({len(sk.errqueue)} unread notification(s),"
            f" {len(sk.zc_inflight)} in flight)",
            "sock_omalloc",
        )
    sk.omem += _notify_truesize(sk)
    uarg = [sk.zckey, 1, 1, size]  # id, len, zerocopy-still-possible, bytelen
    sk.zckey = (sk.zckey + 1) % U32
    return uarg


def abort_notification(sk: Sock, uarg: list[int] | None = None, extended: bool = False) -> None:
    """msg_zerocopy_put_abort(): a failed send gives its id back and queues nothing.

    An extended uarg only shrinks by the id it had just taken (``uarg->len--``); a fresh one is freed.
    """
    sk.zckey = (sk.zckey - 1) % U32
    if extended and uarg is not None:
        uarg[1] -= 1
        return
    sk.omem -= _notify_truesize(sk)


def mark_copied(uarg: list[int]) -> None:
    """uarg->zerocopy = 0 (no SG at send time) or msg_zerocopy_callback(success=false) after a deferred copy."""
    uarg[2] = 0


def finish_send(host: "Host", sk: Sock, uarg: list[int], in_flight: bool) -> None:
    """Hand the send's notification to completion now, or keep it while data is unacked / completions deferred."""
    if host.net.zerocopy_mode == ZEROCOPY_DEFERRED or in_flight:
        if not sk.zc_inflight:
            sk.zc_inflight = []
        sk.zc_inflight.append(uarg)
        if host.net.zerocopy_mode == ZEROCOPY_DEFERRED:
            host.net.zc_waiting.append((sk, uarg))
    else:
        complete(sk, uarg)


def complete_acked(sk: Sock) -> None:
    """All queued stream data was taken by the peer: the in-flight uargs (not deferred ones) complete in order."""
    sk.zc_tail = None  # the write queue is empty: nothing left for a later send to join
    if not sk.zc_inflight:
        return
    deferred = {id(uarg) for owner, uarg in sk.host.net.zc_waiting if owner is sk}
    keep = []
    for uarg in sk.zc_inflight:
        if id(uarg) in deferred:
            keep.append(uarg)
        else:
            complete(sk, uarg)
    sk.zc_inflight = keep


def complete(sk: Sock, uarg: list[int]) -> None:
    """__msg_zerocopy_callback(): queue [lo, hi], or extend the tail notification when contiguous."""
    lo, length, zc_ok = uarg[:3]
    if sk.orphan:
        sk.omem -= _notify_truesize(sk)  # SOCK_DEAD: no notification
        return
    code = 0 if zc_ok else SO_EE_CODE_ZEROCOPY_COPIED
    hi = (lo + length - 1) % U32
    queue = sk.errqueue
    if not queue:
        queue = sk.errqueue = []
    else:
        tail = queue[-1]
        old_lo, old_hi = tail[1], tail[2]
        span = (old_hi - old_lo) % U32 + 1 + length
        # skb_zerocopy_notify_extend(): contiguous and the range still fits in 32 bits;
        # note that ee_code is not compared, the tail keeps its own code.
        if span < U32 and lo == (old_hi + 1) % U32:
            tail[2] = (old_hi + length) % U32
            sk.omem -= _notify_truesize(sk)  # consume_skb() of the merged notification
            return
    # A fourth field marks a code the kernel does not always give (see uncertain_code()).
    queue.append([code, lo, hi, len(uarg) > 3 and uarg[3]])


def read_notification(sk: Sock) -> dict[str, int]:
    """ip_recv_error() -> sock_dequeue_err_skb(): one sock_extended_err per recvmsg(MSG_ERRQUEUE)."""
    if not sk.errqueue:
        raise fail("EAGAIN", "error queue is empty (reading it never blocks)", "ip_recv_error")
    code, lo, hi, uncertain = sk.errqueue.pop(0)
    sk.omem -= _notify_truesize(sk)
    note = {"origin": SO_EE_ORIGIN_ZEROCOPY, "code": code, "lo": lo, "hi": hi, "errno": 0}
    if uncertain:
        note["uncertain"] = True  # read by the caller; never part of what the kernel answers
    return note


def uncertain_code(uarg: list[int]) -> None:
    """Mark a send whose completion code is code 0 only most of the time.

    Measured on the 6.1 guests (``ethtool -K lab0 sg off``, completions read after every send): TCP
    MSG_ZEROCOPY sends across the segment complete with code 0 for 116 of 120 sends of 4 KiB and
    91 of 96 of 64 KiB, COPIED for the rest. sk_setup_caps() gives every TCP socket NETIF_F_SG, so
    tcp_sendmsg_locked() keeps uarg->zerocopy = 1. A GSO skb is then segmented by copy
    (skb_segment() without NETIF_F_SG), which marks nothing. A segment of at most one MSS is not
    GSO: validate_xmit_skb() linearises it, pskb_expand_head() calls skb_orphan_frags(), and
    skb_copy_ubufs() reports the copy. So sends of 1,000 and 1,448 bytes (the MSS) complete COPIED,
    and 1,449, 4,096 and 20,000 bytes code 0 (measured 2026-12-08, one send per read). The few
    COPIED ones among larger sends are tails that the window or cwnd cut to one segment; which
    ones depends on timing. The socket segment, whose NIC has no scatter-gather, behaves the same.
    """
    if len(uarg) == 3:
        uarg.append(1)
