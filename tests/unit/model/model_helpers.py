"""Helpers shared by the model tests: open sockets, listeners."""

from __future__ import annotations

from harness.model.constants import AF_INET, SOCK_DGRAM, SOCK_STREAM


def tcp(host, user="root", flags=0, family=AF_INET) -> int:
    result = host.call("socket", {"family": family, "type": SOCK_STREAM | flags}, user=user)
    assert result.ok, result
    return result.ret


def udp(host, user="root", flags=0, family=AF_INET) -> int:
    result = host.call("socket", {"family": family, "type": SOCK_DGRAM | flags}, user=user)
    assert result.ok, result
    return result.ret


def listener(host, port, backlog=8, user="root", reuse=False) -> int:
    fd = tcp(host, user=user)
    if reuse:
        assert host.call("setsockopt", {"fd": fd, "level": 1, "optname": 2, "value": 1}, user=user).ok
    assert host.call("bind", {"fd": fd, "addr": ("0.0.0.0", port)}, user=user).ok
    assert host.call("listen", {"fd": fd, "backlog": backlog}, user=user).ok
    return fd


def errno_of(result) -> str | None:
    return result.errno
