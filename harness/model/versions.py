"""What differs between the kernels the model knows (6.1, 6.12, 7.2), in one place.

Every rule that depends on the kernel's version is a ``VersionRule``: its
values, each with the first version that has it and the change that made it
(a commit subject, or the release it was measured on when the commit is not
known). The differences were found by measuring the Debian kernels the labs
boot (bookworm 6.1, trixie 6.12, forky 7.2), not by reading changelogs; each
rule says what was measured.

Some defaults the kernel computes at boot from the memory it finds
(``tcp_init()``, ``udp_init()``, ``tcp_set_hashinfo()``). Those are computed
here from the VM's memory by the same formulas, not copied from one guest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KERNELS = ("6.1", "6.12", "7.2")
DEFAULT_KERNEL = "6.1"
PAGE_SHIFT = 12
DEFAULT_MEMORY_MIB = 512


def version_key(series: str) -> tuple[int, ...]:
    return tuple(int(part) for part in series.split("."))


def series_of(release: str) -> str:
    """``6.12.118+deb13-cloud-amd64`` -> ``6.12``; a series the model knows, else ValueError."""
    head = release.split("-", 1)[0].split("+", 1)[0]
    parts = head.split(".")
    candidate = ".".join(parts[:2])
    if candidate not in KERNELS:
        raise ValueError(f"kernel {release!r} is of series {candidate}; the model knows {', '.join(KERNELS)}")
    return candidate


def nearest_series(release: str) -> str:
    """The newest series the model knows that is not newer than ``release`` (a user's 6.15 -> 6.12)."""
    head = release.split("-", 1)[0].split("+", 1)[0].split(".")
    try:
        wanted = (int(head[0]), int(head[1]))
    except (IndexError, ValueError):
        raise ValueError(f"{release!r} is not a kernel release") from None
    known = [k for k in KERNELS if version_key(k) <= wanted]
    if not known:
        raise ValueError(f"kernel {release!r} is older than every series the model knows ({', '.join(KERNELS)})")
    return known[-1]


def check_kernel(kernel: str) -> str:
    """A model kernel name (``6.12``) or a release (``6.12.118+deb13-cloud-amd64``) -> the series."""
    if kernel in KERNELS:
        return kernel
    return series_of(kernel)


@dataclass(frozen=True)
class Change:
    """From ``since`` on, the rule has ``value``; ``cause`` says which change made it so."""

    since: str
    value: Any
    cause: str


@dataclass(frozen=True)
class VersionRule:
    """A behaviour or default that is not the same on every kernel the model knows."""

    name: str
    what: str
    changes: tuple[Change, ...]

    def at(self, kernel: str) -> Change:
        series = version_key(check_kernel(kernel))
        chosen = self.changes[0]
        for change in self.changes:
            if version_key(change.since) <= series:
                chosen = change
        return chosen

    def value(self, kernel: str) -> Any:
        return self.at(kernel).value

    def describe(self, kernel: str) -> str:
        """``optmem_max 131072 since 6.8 (net: increase optmem_max default value)``, for reports."""
        change = self.at(kernel)
        later = [c for c in self.changes if version_key(c.since) > version_key(change.since)]
        until = f" until {later[0].since}" if later else ""
        return f"{self.name} = {change.value} since {change.since}{until}: {change.cause}"


RULES: dict[str, VersionRule] = {rule.name: rule for rule in (
    VersionRule(
        "net.core.optmem_max", "per-socket option memory (ancillary data, MSG_ZEROCOPY notifications)",
        (Change("6.1", 20480, "sizeof(long) * (2 * UIO_MAXIOV + 512) on x86_64"),
         # Measured: 20480 on 6.1.0-57, 131072 on 6.12.118 and 7.2.12.
         Change("6.8", 131072, 'commit "net: increase optmem_max default value" (128 KB, v6.8)'))),
    VersionRule(
        "net.core.rmem_max", "the most SO_RCVBUF may ask for without CAP_NET_ADMIN",
        (Change("6.1", 212992, "SK_RMEM_MAX = SKB_TRUESIZE(256) * 256"),
         # Measured: 212992 on 6.1.0-57 and 6.12.118, 4194304 on 7.2.12.
         Change("7.2", 4194304, "raised to 4 MB after 6.12 (measured on 7.2.12; the commit is not "
                                "identified here, so 7.2 is the first version known to have it)"))),
    VersionRule(
        "net.core.wmem_max", "the most SO_SNDBUF may ask for without CAP_NET_ADMIN",
        (Change("6.1", 212992, "SK_WMEM_MAX = SKB_TRUESIZE(256) * 256"),
         Change("7.2", 4194304, "raised to 4 MB after 6.12, with rmem_max (measured on 7.2.12)"))),
    VersionRule(
        "zerocopy_notification_truesize", "what one MSG_ZEROCOPY notification skb (sock_omalloc(sk, 0)) "
        "charges to sk_omem_alloc: its truesize",
        # Measured with ss -m (skmem o) after one queued notification: 768 on 6.1.0-57, 896 on 6.12.118.
        (Change("6.1", 768, "kmalloc-512 head (SKB_DATA_ALIGN(0) + 320 of shared info) + 256 of sk_buff"),
         Change("6.12", 896, "the head comes from skb_small_head_cache (v6.3, \"net: add dedicated kmem_cache "
                             "for typical/small skb->head\"), 640-byte objects on this kernel: SKB_TRUESIZE(320); "
                             "first measured on 6.12"))),
    VersionRule(
        "ss_lists_bound_only_tcp", "whether ss shows a TCP socket that is bound but neither listening nor "
        "connected (as UNCONN, with skmem and no tcp_info)",
        # Measured: not listed on 6.1.0-57 (bookworm's ss); listed on 6.12.118 and 7.2.12 by their ss
        # (iproute2 6.15); bookworm's ss run on 6.12 still shows none.
        (Change("6.1", False, "inet_diag dumps only the established and listening hashes"),
         Change("6.8", True, 'commit "tcp: Dump bound-only sockets in inet_diag." (v6.8), with an ss that asks '
                             "for them"))),
    VersionRule(
        "virtio_net_ethtool_queue_packets", "whether `ethtool -S` of a virtio-net NIC counts each queue's "
        "packets and bytes (rx_queue_0_packets, tx_queue_0_packets)",
        # Measured: present on 6.1.0-57; on 6.12.118 and 7.2.12 ethtool -S lists only rx0_*/tx0_* drops,
        # kicks and XDP counters (packets and bytes went to the netdev queue statistics).
        (Change("6.1", True, "virtnet_get_ethtool_stats() reports the per-queue packets and bytes"),
         Change("6.12", False, "virtio-net's statistics rework moved packets and bytes out of ethtool -S; "
                               "first measured on 6.12 (the exact release is not pinned down here)"))),
    VersionRule(
        "so_busy_poll_raise_needs_cap_net_admin", "whether an unprivileged SO_BUSY_POLL may only lower "
        "sk_ll_usec (raising it is EPERM without CAP_NET_ADMIN)",
        # Measured with labs/09-epoll/busypoll.yaml (a student's socket at busy_read 20 asks for 50):
        # EPERM on 6.1.0-57, 0 on 6.12.118 and 7.2.12.
        (Change("6.1", True, "sk_setsockopt(): \"allow unprivileged users to decrease the value\", raising needs "
                             "CAP_NET_ADMIN"),
         Change("6.12", False, "sk_setsockopt() sets SO_BUSY_POLL without the capability check (first measured on "
                               "6.12; the commit is not identified here)"))),
    VersionRule(
        "unix_dgram_peer_checked_after_alloc", "whether unix_dgram_sendmsg() (net/unix/af_unix.c) of a datagram "
        "socket with no destination looks for its peer only after the size check and the skb allocation, so "
        "that EMSGSIZE and a SHUT_WR's EPIPE (sock_alloc_send_pskb()) come before ENOTCONN",
        # Measured (tests/corpus/fuzz-1-13, -161, -403 and a probe): an unconnected AF_UNIX SOCK_DGRAM socket
        # after shutdown(SHUT_WR) sends ENOTCONN on 6.1.0-57 and 6.12.118, EPIPE on 7.2.12; with 300000
        # bytes and no shutdown, ENOTCONN on 6.1/6.12 (unix_peer_get() first) and EMSGSIZE on 7.2.12.
        (Change("6.1", False, "unix_dgram_sendmsg(): unix_peer_get() right after the address checks, "
                              "ENOTCONN before len > sk_sndbuf - 32 and sock_alloc_send_pskb()"),
         Change("7.2", True, "unix_dgram_sendmsg() takes the peer after sock_alloc_send_pskb(), where a missing "
                             "one is ENOTCONN (measured on 7.2.12; the commit is not identified here, so 7.2 is "
                             "the first version known to have it)"))),
    VersionRule(
        "boot_reserved_pages", "pages of a VM's RAM not free when tcp_init()/udp_init() count them "
        "(kernel image, early allocations), beyond the memmap's 1/64",
        # Measured at 512 MiB: nr_free_buffer_pages() at tcp_init() is tcp_rmem[2] >> 5.
        # 6.1.0-57: 116599 free of 131072 pages; 6.12.118: 115613; 7.2.12: 114079. The rest is the larger image
        # (18.8 MB of code on 7.2 vs 14.3 MB on 6.1, per the boot's "Memory:" line).
        (Change("6.1", 14473 - 2048, "measured on 6.1.0-57-cloud-amd64 at 512 MiB"),
         Change("6.12", 15459 - 2048, "measured on 6.12.118+deb13-cloud-amd64 at 512 MiB"),
         Change("7.2", 16993 - 2048, "measured on 7.2.12+deb14-cloud-amd64 at 512 MiB"))),
)}


def free_buffer_pages(memory_mib: int, kernel: str) -> int:
    """nr_free_buffer_pages() as tcp_init() sees it in a VM with ``memory_mib`` of RAM."""
    pages = memory_mib << (20 - PAGE_SHIFT)
    memmap = pages // 64  # struct page is 64 bytes per 4 KiB page
    return pages - memmap - RULES["boot_reserved_pages"].value(kernel)


def boot_defaults(memory_mib: int, kernel: str) -> dict[str, Any]:
    """The sysctls the kernel sizes from memory at boot, computed as it does."""
    free = free_buffer_pages(memory_mib, kernel)
    # tcp_init_mem(): limit = max(nr_free_buffer_pages() / 16, 128)
    limit = max(free // 16, 128)
    tcp_mem = (limit // 4 * 3, limit, limit // 4 * 3 * 2)
    # udp_init(): the same with / 8
    udp_limit = max(free // 8, 128)
    udp_mem = (udp_limit // 4 * 3, udp_limit, udp_limit // 4 * 3 * 2)
    # tcp_init(): per-socket maxima are at most 1/128 of the pressure threshold
    per_socket = free << (PAGE_SHIFT - 7)
    wmem_max_tcp = max(64 * 1024, min(4 * 1024 * 1024, per_socket))
    rmem_max_tcp = max(131072, min(6 * 1024 * 1024, per_socket))
    # tcp_set_hashinfo(): alloc_large_system_hash("TCP established", ..., scale 17) gives one
    # bucket per 128 KiB of free kernel memory, rounded up to a power of two; then
    # tcp_max_syn_backlog = max(128, ehash entries / 128).
    ehash = 1 << max(0, (free >> (17 - PAGE_SHIFT)) - 1).bit_length()
    return {
        "net.ipv4.tcp_mem": tcp_mem,
        "net.ipv4.udp_mem": udp_mem,
        "net.ipv4.tcp_wmem": (4096, 16384, wmem_max_tcp),
        "net.ipv4.tcp_rmem": (4096, 131072, rmem_max_tcp),
        "net.ipv4.tcp_max_syn_backlog": max(128, ehash // 128),
    }


def differences(kernel: str, base: str = DEFAULT_KERNEL) -> list[str]:
    """Every rule whose value on ``kernel`` is not its value on ``base``, described for ``kernel``."""
    return [rule.describe(kernel) for rule in RULES.values()
            if rule.value(kernel) != rule.value(base) and rule.name != "boot_reserved_pages"]
