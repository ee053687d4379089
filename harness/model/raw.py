"""SOCK_RAW, ping and unmodelled families: creation and bind checks only; their traffic is out of scope."""

from __future__ import annotations

from .addr import ANY4, ANY6, SOCKADDR_IN_LEN
from .constants import AF_INET6, TCP_CLOSE
from .result import Result, fail


def raw_bind(op, host, creds, f, sa) -> Result:
    """raw_bind()/ping_bind(): CLOSE state and a full sockaddr_in; the address must be local."""
    sk = f.sock
    if sk.sk_state != TCP_CLOSE or sa.addrlen < SOCKADDR_IN_LEN:
        raise fail("EINVAL", "raw bind needs an unbound socket and a full sockaddr", "raw_bind")
    local = host.is_local6(sa.host) if sk.family == AF_INET6 else host.is_local4(sa.host)
    if sa.host not in (ANY4, ANY6) and not local and not sk.freebind:
        raise fail("EADDRNOTAVAIL", f"{sa.host} is not local", "raw_bind")
    sk.rcv_addr = sa.host
    return Result(op, 0, None, f"raw socket bound to {sa.host}", "raw_bind")


def raw_sendmsg(op, host, creds, f, payload, flags, dest) -> Result:
    raise fail("EOPNOTSUPP", "raw and ping traffic is not modelled", "model")


def raw_recvmsg(op, host, f, length, flags) -> Result:
    raise fail("EOPNOTSUPP", "raw and ping traffic is not modelled", "model")


def raw_release(host, sk) -> str:
    sk.orphan = True
    return "released"


def opaque_unsupported(op, host, *args) -> Result:
    raise fail("EOPNOTSUPP", "this address family is only modelled as far as socket() goes", "model")


def opaque_getname(op, host, f, peer) -> Result:
    raise fail("EOPNOTSUPP", "this address family is only modelled as far as socket() goes", "model")
