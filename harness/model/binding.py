"""Port ownership for inet sockets: get_port (explicit and ephemeral), autobind, release, owner descriptions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .addr import ANY4, ANY6
from .constants import AF_INET6, SOCK_STREAM, TCP_STATE_NAMES
from .ports import PortTable
from .result import fail
from .sock import Sock
from .views import _owner_index, ep_text

if TYPE_CHECKING:
    from .host import Host


def port_table(host: "Host", sk: Sock) -> PortTable:
    """TCP and UDP keep separate bind tables (v4 and v6 share them)."""
    return host.udp_ports if sk.type != SOCK_STREAM else host.tcp_ports


def get_port(host: "Host", sk: Sock, port: int, fn: str) -> tuple[int, str]:
    """sk->sk_prot->get_port(): inet_csk_get_port (TCP) or udp_v4_get_port (UDP); sk.rcv_addr is already set.

    Returns (port, rule); raises EADDRINUSE naming the owner and the reuse rule that failed.
    """
    table = port_table(host, sk)
    if port == 0:
        chosen = _ephemeral(host, sk, table)
        low, high = host.sysctls["net.ipv4.ip_local_port_range"]
        parity = None if table.udp else 1
        how = "odd ports first" if parity == 1 else "any parity"
        if parity == 1 and sk.reuse:
            how += ", lower half first because of SO_REUSEADDR"
        return chosen, f"ephemeral port {chosen} from ip_local_port_range {low}-{high} ({how})"
    owner, reason = table.find_conflict(sk, port)
    if owner is not None:
        raise fail("EADDRINUSE", f"port {port} owned by {describe_owner(host, owner)}: {reason}",
                   "udp_lib_lport_inuse" if table.udp else tcp_conflict_fn(sk, owner))
    return port, f"port {port}: {reason}"


def _ephemeral(host: "Host", sk: Sock, table: PortTable) -> int:
    """The ephemeral half of get_port: a free port from ip_local_port_range, or EADDRINUSE."""
    low, high = host.sysctls["net.ipv4.ip_local_port_range"]
    chosen = table.pick_ephemeral(sk, low, high, host.rng, None if table.udp else 1)
    if not chosen:
        raise fail("EADDRINUSE", f"no free port left in ip_local_port_range {low}-{high}",
                   "inet_csk_find_open_port" if not table.udp else "udp_lib_get_port")
    return chosen


def tcp_conflict_fn(sk: Sock, owner) -> str:
    """Where the kernel finds a TCP port conflict (seen in the guests' function_graph traces).

    A socket binding a specific address next to a wildcard owner has no bhash2 bucket of its
    own: inet_csk_get_port() finds the conflict in inet_bhash2_addr_any_conflict(). Every
    other conflict is found by inet_csk_bind_conflict().
    """
    wildcard = (ANY4, ANY6)
    if isinstance(owner, Sock) and owner.rcv_addr in wildcard and sk.rcv_addr not in wildcard:
        return "inet_bhash2_addr_any_conflict"
    return "inet_csk_bind_conflict"


def describe_owner(host: "Host", owner) -> str:
    if not isinstance(owner, Sock):
        return f"a TIME_WAIT socket ({ep_text(owner, False)})"
    user_fd = _owner_index(host).get(id(owner))
    state = TCP_STATE_NAMES[owner.sk_state] if owner.type == SOCK_STREAM else "bound"
    where = f"fd {user_fd[1]} of {user_fd[0]}" if user_fd else "a socket with no descriptor"
    return f"{where} ({state} on {ep_text(owner, False)})"


def autobind(host: "Host", sk: Sock) -> None:
    """inet_autobind(): a UDP socket that sends or connects unbound gets an ephemeral port."""
    if sk.bound:
        return
    sk.rcv_addr = ANY6 if sk.family == AF_INET6 else ANY4
    table = port_table(host, sk)
    port = _ephemeral(host, sk, table)  # get_port(sk, 0) without the rule text nobody reads
    sk.port = port
    sk.bound = True
    table.add(sk, port)


def unbind(host: "Host", sk: Sock) -> None:
    """inet_put_port()/udp_lib_unhash(): give the port back."""
    if sk.bound:
        port_table(host, sk).remove(sk, sk.port)
        sk.bound = False
        sk.port = 0


