"""Socket address parsing: turn step arguments into the (family, host, port, addrlen) the kernel would see."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Any, NamedTuple

from .constants import AF_INET, AF_INET6, AF_UNIX, AF_UNSPEC
from .result import fail

SOCKADDR_STORAGE = 128
SOCKADDR_IN_LEN = 16
SOCKADDR_IN6_LEN = 28
SIN6_LEN_RFC2133 = 24
SUN_PATH_OFFSET = 2
SOCKADDR_UN_LEN = 110

ANY4 = "0.0.0.0"
ANY6 = "::"


class SockAddr(NamedTuple):
    """A decoded sockaddr as the kernel sees it after move_addr_to_kernel() (a tuple: cheap to build)."""

    family: int
    host: str  # canonical IP text, or the AF_UNIX path ('@name' for abstract names)
    port: int
    addrlen: int


@lru_cache(maxsize=4096)
def canonical_ip(text: str) -> tuple[int, str] | None:
    """(family, canonical text) for an IP literal, None if it is not one."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        # inet_ntop() (and the guest agent) write a v4-mapped address with its IPv4 part dotted.
        return AF_INET6, f"::ffff:{mapped}" if mapped is not None else ip.compressed
    return AF_INET, ip.compressed


@lru_cache(maxsize=4096)
def v4_of_v6(text: str) -> str | None:
    """The IPv4 address inside a v4-mapped IPv6 address, else None (also for IPv4 text)."""
    if ":" not in text:
        return None
    mapped = ipaddress.IPv6Address(text).ipv4_mapped
    return None if mapped is None else str(mapped)


def is_loopback4(host: str) -> bool:
    return host.startswith("127.")


def default_len(family: int, host: str) -> int:
    if family == AF_INET6:
        return SOCKADDR_IN6_LEN
    if family == AF_UNIX:
        if host.startswith("@"):
            return SUN_PATH_OFFSET + len(host)  # abstract: leading NUL + name, no terminator
        return SUN_PATH_OFFSET + len(host.encode()) + 1
    return SOCKADDR_IN_LEN


def _int_family(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail("EINVAL", f"sockaddr family {value!r} is not an integer", "move_addr_to_kernel")
    return value


def parse_sockaddr(args: dict[str, Any], key: str = "addr") -> SockAddr:
    """Decode args[key] (tuple, dict or AF_UNIX path) plus optional 'family'/'addrlen' overrides."""
    raw = args.get(key)
    if type(raw) is tuple and len(raw) == 2 and "family" not in args and "addrlen" not in args:
        # fast path for the common (host, port) form
        host, port = raw
        if type(host) is str and type(port) is int and 0 <= port <= 0xFFFF:
            parsed = canonical_ip(host) if host else (AF_INET, ANY4)
            if parsed is not None:
                family = parsed[0]
                return SockAddr(family, parsed[1], port, SOCKADDR_IN6_LEN if family == AF_INET6 else SOCKADDR_IN_LEN)
    if raw is None:
        raise fail("EFAULT", f"no {key} given: the kernel would fault copying a NULL sockaddr",
                   "move_addr_to_kernel")
    family_override = args.get("family")
    if isinstance(raw, dict):
        family_override = raw.get("family", family_override)
        host = raw.get("host", raw.get("addr", raw.get("path", "")))
        port = raw.get("port", 0)
    elif isinstance(raw, str):
        host, port = raw, 0
        if family_override is not None and "addrlen" not in args:
            # A path laid out as sockaddr_un under another sa_family: the protocol judges it by its length.
            return SockAddr(_int_family(family_override), raw, 0, default_len(AF_UNIX, raw))
        if family_override is None:
            family_override = AF_UNIX
    elif isinstance(raw, (tuple, list)) and len(raw) >= 2:
        host, port = raw[0], raw[1]
    else:
        raise fail("EINVAL", f"cannot read {raw!r} as a sockaddr", "move_addr_to_kernel")
    if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
        raise fail("EINVAL", f"cannot read {raw!r} as a sockaddr", "move_addr_to_kernel")
    if family_override is not None:
        if isinstance(family_override, bool) or not isinstance(family_override, int):
            raise fail("EINVAL", f"sockaddr family {family_override!r} is not an integer", "move_addr_to_kernel")
        family = family_override
    else:
        family = AF_INET6 if ":" in host else AF_INET
    if family in (AF_INET, AF_INET6, AF_UNSPEC) or (family != AF_UNIX and not isinstance(raw, str)):
        if not 0 <= port <= 0xFFFF:
            raise fail("EINVAL", f"port {port} does not fit the 16-bit sin_port field", "move_addr_to_kernel")
        parsed = canonical_ip(host) if host else (family, ANY4 if family != AF_INET6 else ANY6)
        if parsed is None:
            raise fail("EINVAL", f"{host!r} is not an IP address (inet_pton would reject it)",
                       "move_addr_to_kernel")
        host = parsed[1]
        if family in (AF_INET, AF_UNSPEC) and ":" in host:
            # IPv6 text under an AF_INET (or AF_UNSPEC) sa_family is laid out as sockaddr_in6; read as
            # sockaddr_in, sin_addr is the zero sin6_flowinfo (measured: fuzz-1-184, 1-214, 1-272).
            host = ANY4
    addrlen = args.get("addrlen")
    if addrlen is None and family not in (AF_INET, AF_INET6, AF_UNSPEC, AF_UNIX):
        # Another family's number on an IP address: the length is the layout's (as the agent sends it).
        addrlen = SOCKADDR_IN6_LEN if ":" in host else SOCKADDR_IN_LEN
    if addrlen is None:
        addrlen = default_len(family, host)
    elif isinstance(addrlen, bool) or not isinstance(addrlen, int):
        raise fail("EINVAL", f"addrlen {addrlen!r} is not an integer", "move_addr_to_kernel")
    if addrlen < 0 or addrlen > SOCKADDR_STORAGE:
        # move_addr_to_kernel(): ulen < 0 || ulen > sizeof(struct sockaddr_storage)
        raise fail("EINVAL", f"addrlen {addrlen} outside 0..128", "move_addr_to_kernel")
    return SockAddr(family, host, port, addrlen)
