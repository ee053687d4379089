"""Kernel memory arithmetic for x86_64 6.1: skb truesize, buffer minimums, TCP send-buffer expansion."""

from __future__ import annotations

from functools import lru_cache

CACHE_LINE = 64
SKB_STRUCT_ALIGNED = 256  # SKB_DATA_ALIGN(sizeof(struct sk_buff)); SOCK_MIN_SNDBUF = 2 * (2048 + this)
SKB_SHINFO_ALIGNED = 320  # SKB_DATA_ALIGN(sizeof(struct skb_shared_info)) with MAX_SKB_FRAGS 17
TCP_SKB_MIN_TRUESIZE = 2048 + SKB_STRUCT_ALIGNED
SOCK_MIN_SNDBUF = 2 * TCP_SKB_MIN_TRUESIZE  # 4608, include/net/sock.h
SOCK_MIN_RCVBUF = TCP_SKB_MIN_TRUESIZE  # 2304
# L1_CACHE_ALIGN(128 + MAX_HEADER). netdevice.h uses LL_MAX_HEADER 128 only when CONFIG_HYPERV_NET is
# built in (`defined()`, not IS_ENABLED); Debian builds hv_netvsc as a module and has no WLAN/AX25, so
# LL_MAX_HEADER is 32, plus 48 for the tunnel modules (ipip, gre, sit): 128 + 80 = 208 -> 256.
# Measured on the guest: a fresh MTU-1500 connection gets sk_sndbuf 46080 = 2 * 10 * (2048 + 256).
MAX_TCP_HEADER = 256
TCP_INIT_CWND = 10
TCP_INIT_REORDERING = 3
INT_MAX = 2**31 - 1
U32_MASK = 2**32 - 1

_KMALLOC_CACHES = (8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192)


def skb_data_align(size: int) -> int:
    return (size + CACHE_LINE - 1) & ~(CACHE_LINE - 1)


def skb_truesize(size: int) -> int:
    """SKB_TRUESIZE(X): the estimate sock_omalloc() checks against optmem_max."""
    return size + SKB_STRUCT_ALIGNED + SKB_SHINFO_ALIGNED


def kmalloc_roundup(size: int) -> int:
    """kmalloc_size_roundup() for SLUB: the slab size, or whole pages above 8 KiB."""
    for cache in _KMALLOC_CACHES:
        if size <= cache:
            return cache
    pages = 4096
    while pages < size:
        pages <<= 1
    return pages


def alloc_skb_truesize(size: int) -> int:
    """skb->truesize after alloc_skb(size): __alloc_skb() keeps the whole kmalloc object."""
    return kmalloc_roundup(skb_data_align(size) + SKB_SHINFO_ALIGNED) + SKB_STRUCT_ALIGNED


ZC_NOTIFY_CHECK = skb_truesize(0)  # 576: what sock_omalloc(sk, 0) compares with optmem_max
ZC_NOTIFY_TRUESIZE = alloc_skb_truesize(0)  # 768: what it then charges to sk_omem_alloc


def roundup_pow_of_two(value: int) -> int:
    return 1 << (value - 1).bit_length()


def tcp_sndbuf_expand(mss_clamp: int, mss_cache: int, wmem_max_tcp: int, current: int) -> int:
    """tcp_sndbuf_expand(): room for 2 * max(cwnd 10, reordering + 1) worst-case skbs."""
    per_mss = max(mss_clamp, mss_cache) + MAX_TCP_HEADER + SKB_SHINFO_ALIGNED
    per_mss = roundup_pow_of_two(per_mss) + SKB_STRUCT_ALIGNED
    segments = max(TCP_INIT_CWND, TCP_INIT_REORDERING + 1)
    wanted = 2 * segments * per_mss
    if current < wanted:
        return min(wanted, wmem_max_tcp)
    return current


def tcp_mss(mtu: int, ipv6: bool) -> tuple[int, int]:
    """(advertised MSS clamp, mss_cache with the 12-byte timestamp option) for a path MTU."""
    header = 60 if ipv6 else 40
    clamp = min(mtu, 65535) - header  # ipv4_default_advmss caps at IPV4_MAX_PMTU - headers
    return clamp, clamp - 12


@lru_cache(maxsize=1024)
def udp_skb_truesize(payload: int) -> int:
    """Truesize of a linear UDP skb built by __ip_append_data (hh 16 + IP 20 + UDP 8 + 15 slack)."""
    return alloc_skb_truesize(payload + 8 + 20 + 16 + 15)
