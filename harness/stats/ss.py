"""Parse ``ss -tuxanmieHO`` (iproute2 6.1): one socket per line into ``Socket`` records.

The options, and why each matters to the parser:

* ``-t -u -x -a``: TCP, UDP and AF_UNIX sockets, listening and not.
* ``-n``: numeric ports and rates (``send 207460036bps`` rather than ``207Mbps``).
* ``-m``: ``skmem:(…)`` from sock_diag's SK_MEMINFO array.
* ``-i``: ``struct tcp_info`` for TCP.
* ``-e``: ``uid:``, ``ino:``, ``sk:`` (the socket cookie), ``v6only:`` and the
  shutdown arrows; it also turns on the ``timer:(…)`` column.
* ``-H``: no header line.
* ``-O``: one line per socket. Without it ss moves ``skmem`` and the TCP info
  to a tab-indented second line.

With stdout not a terminal ss sizes each column to its widest entry and never
wraps or cuts one, so splitting on whitespace is safe, except for AF_UNIX paths,
which may contain spaces and are matched by position instead.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from .errors import Origin, StatsFormatError, StatsTruncatedError
from .snapshot import Endpoint, FrozenDict, SkMem, Socket, TcpInfo

SS_COMMAND = "ss -tuxanmieHO"

INET_NETIDS = frozenset({"tcp", "udp"})
UNIX_NETIDS = frozenset({"u_str", "u_dgr", "u_seq"})
# sstate_name[] in ss.c, indexed by the kernel's TCP_* state numbers.
STATES = frozenset({"UNKNOWN", "ESTAB", "SYN-SENT", "SYN-RECV", "FIN-WAIT-1", "FIN-WAIT-2", "TIME-WAIT",
                    "UNCONN", "CLOSE-WAIT", "LAST-ACK", "LISTEN", "CLOSING"})
# TIME-WAIT and SYN-RECV entries are inet_timewait_sock / request_sock mini sockets:
# inet_diag has no struct sock to take skmem or tcp_info from.
MINI_SOCKET_STATES = frozenset({"TIME-WAIT", "SYN-RECV"})
# An orphaned socket in FIN-WAIT-2 becomes a timewait mini socket too (tcp_time_wait(sk, TCP_FIN_WAIT2, …)
# in net/ipv4/tcp_input.c and tcp.c); inet_twsk_diag_fill() reports its tw_substate as the state and
# the timewait timer (3): ss prints FIN-WAIT-2 with timer:(timewait,…).
TIMEWAIT_TIMER = "(timewait,"
# Bare words tcp_stats_print() prints before the congestion control name (TCPI_OPT_* bits).
TCP_OPTION_WORDS = frozenset({"ts", "sack", "ecn", "ecnseen", "fastopen"})
# "name value" pairs in the TCP info: the value is a separate token.
TCP_SPACED_FIELDS = frozenset({"send", "pacing_rate", "delivery_rate"})

_HEAD = re.compile(r"^(?P<netid>\S+)\s+(?P<state>\S+)\s+(?P<recv_q>\S+)\s+(?P<send_q>\S+)\s+(?P<rest>.*)$")
# AF_UNIX: "<path> <inode>  <peer path> <peer inode>  details…"; the path is whatever precedes
# the first " <digits> <word> <digits>" so that paths with spaces survive.
_UNIX_ADDRS = re.compile(r"^(?P<path>.*?) (?P<ino>\d+)\s+(?P<peer>\S+) (?P<peer_ino>\d+)(?:\s+(?P<details>.*))?$")
_SHUTDOWN = re.compile(r"^[<-]-[>-]$")
_SKMEM = re.compile(r"^skmem:\((?P<body>[^()]*)\)$")
_SKMEM_ITEM = re.compile(r"^(?P<letters>[a-z]+)(?P<value>\d+)$")

# tcp_info fields parsed into typed TcpInfo attributes: ss key -> (attribute, type).
_TCP_NUMBERS: dict[str, tuple[str, type]] = {
    "rto": ("rto_ms", float), "ato": ("ato_ms", float), "minrtt": ("min_rtt_ms", float),
    "backoff": ("backoff", int), "mss": ("mss", int), "rcvmss": ("rcv_mss", int), "advmss": ("advmss", int),
    "pmtu": ("pmtu", int), "cwnd": ("cwnd", int), "ssthresh": ("ssthresh", int),
    "bytes_sent": ("bytes_sent", int), "bytes_retrans": ("bytes_retrans", int),
    "bytes_acked": ("bytes_acked", int), "bytes_received": ("bytes_received", int),
    "segs_out": ("segs_out", int), "segs_in": ("segs_in", int),
    "data_segs_out": ("data_segs_out", int), "data_segs_in": ("data_segs_in", int),
    "delivered": ("delivered", int), "unacked": ("unacked", int), "lost": ("lost", int),
    "notsent": ("notsent_bytes", int), "rcv_space": ("rcv_space", int), "rcv_ssthresh": ("rcv_ssthresh", int),
    "snd_wnd": ("snd_wnd", int),
}
_TCP_RATES = {"send": "send_bps", "pacing_rate": "pacing_rate_bps", "delivery_rate": "delivery_rate_bps"}


class _Line:
    """One line being parsed: raises errors that carry the VM, the command and the line."""

    def __init__(self, origin: Origin, number: int, text: str) -> None:
        self.origin, self.number, self.text = origin, number, text

    def bad(self, problem: str) -> StatsFormatError:
        return StatsFormatError(self.origin, self.number, self.text, problem)

    def cut(self, problem: str) -> StatsTruncatedError:
        return StatsTruncatedError(self.origin, self.number, self.text, problem)

    def integer(self, text: str, what: str) -> int:
        if not text.isdigit():
            raise self.bad(f"{what} {text!r} is not a number")
        return int(text)


def parse_ss(text: str, origin: Origin | None = None) -> tuple[Socket, ...]:
    """Every socket in the output of ``ss -tuxanmieHO``; empty output is an empty table."""
    origin = origin or Origin("?", SS_COMMAND)
    sockets = []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # what follows the final newline
    for number, raw in enumerate(lines, 1):
        if raw.startswith("\t"):  # checked first: the line above it would otherwise look cut
            raise _Line(origin, number, raw).bad("continuation line: ss was run without -O, so entries span two lines")
    for number, raw in enumerate(lines, 1):
        line = _Line(origin, number, raw)
        if raw.startswith("Netid"):
            raise line.bad("header line: ss was run without -H")
        if not raw.strip():
            raise line.bad("blank line (with -O every line is a socket)")
        sockets.append(_parse_socket(line))
    return tuple(sockets)


def _parse_socket(line: _Line) -> Socket:
    head = _HEAD.match(line.text.rstrip())
    if head is None:
        raise line.cut("fewer fields than netid, state, Recv-Q, Send-Q and the addresses")
    netid, state = head["netid"], head["state"]
    if netid not in INET_NETIDS | UNIX_NETIDS:
        raise line.bad(f"unknown netid {netid!r} (expected one of {', '.join(sorted(INET_NETIDS | UNIX_NETIDS))})")
    if state not in STATES:
        raise line.bad(f"unknown state {state!r}")
    recv_q = line.integer(head["recv_q"], "Recv-Q")
    send_q = line.integer(head["send_q"], "Send-Q")
    if netid in UNIX_NETIDS:
        return _parse_unix(line, netid, state, recv_q, send_q, head["rest"])
    return _parse_inet(line, netid, state, recv_q, send_q, head["rest"])


def _parse_inet(line: _Line, netid: str, state: str, recv_q: int, send_q: int, rest: str) -> Socket:
    tokens = rest.split()
    if len(tokens) < 2:
        raise line.cut("the peer address is missing")
    local = _inet_endpoint(line, tokens[0], "local address")
    peer = _inet_endpoint(line, tokens[1], "peer address")
    details = _Details(line, tokens[2:], unix=False)
    if details.inode is None or details.cookie is None:
        raise line.cut("no ino: and sk: fields (ss -e prints them for every inet socket)")
    mini = state in MINI_SOCKET_STATES or (state == "FIN-WAIT-2" and (details.timer or "").startswith(TIMEWAIT_TIMER))
    if details.skmem is None and not mini:
        raise line.cut(f"no skmem:(…) for a {state} socket (ss -m prints it for every full socket)")
    tcp = None
    if netid == "tcp" and state == "UNCONN" and not details.tcp_fields and not details.tcp_tokens:
        # A bound, never-connected TCP socket: kernels since 6.8 list these ("tcp: Dump bound-only
        # sockets in inet_diag"), with skmem but no tcp_info (measured on 6.12.118 and 7.2.12).
        tcp = None
    elif netid == "tcp" and not mini:
        if "cwnd" not in details.tcp_fields:
            raise line.cut("the TCP info is missing or cut short (every full TCP socket reports cwnd)")
        tcp = _tcp_info(line, details)
    elif details.tcp_tokens:
        raise line.bad(f"unexpected fields after skmem for a {netid} {state} socket: {' '.join(details.tcp_tokens)}")
    return Socket(
        netid=netid, state=state, recv_q=recv_q, send_q=send_q, local=local, peer=peer,
        inode=details.inode, uid=details.uid or 0, cookie=details.cookie, v6only=details.v6only,
        shutdown=details.shutdown, timer=details.timer, cgroup=details.cgroup, skmem=details.skmem, tcp=tcp,
        line=line.text,
    )


def _parse_unix(line: _Line, netid: str, state: str, recv_q: int, send_q: int, rest: str) -> Socket:
    match = _UNIX_ADDRS.match(rest.strip())
    if match is None:
        raise line.cut("expected '<path> <inode> <peer> <peer inode>' for an AF_UNIX socket")
    details = _Details(line, (match["details"] or "").split(), unix=True)
    if details.skmem is None:
        raise line.cut("no skmem:(…) (ss -m prints it for every AF_UNIX socket)")
    if details.tcp_tokens:
        raise line.bad(f"unexpected fields for an AF_UNIX socket: {' '.join(details.tcp_tokens)}")
    inode = int(match["ino"])
    return Socket(
        netid=netid, state=state, recv_q=recv_q, send_q=send_q,
        local=Endpoint(match["path"], inode), peer=Endpoint(match["peer"], int(match["peer_ino"])),
        inode=inode, uid=None, cookie=None, v6only=None, shutdown=details.shutdown, timer=details.timer,
        cgroup=None, skmem=details.skmem, tcp=None,
        vfs_inode=details.vfs_inode, vfs_dev=details.vfs_dev, pending=details.pending, line=line.text,
    )


def _inet_endpoint(line: _Line, text: str, what: str) -> Endpoint:
    address, colon, port_text = text.rpartition(":")
    if not colon or not address or not port_text:
        raise line.cut(f"{what} {text!r} is not address:port")
    interface = None
    if "%" in address:  # inet_addr_print() appends %dev for SO_BINDTODEVICE sockets
        address, _, interface = address.rpartition("%")
    if address.startswith("["):
        if not address.endswith("]"):
            raise line.cut(f"{what} {text!r} has an unclosed [")
        address = address[1:-1]
        _check_address(line, ipaddress.IPv6Address, address, what)
    elif address != "*":
        _check_address(line, ipaddress.IPv4Address, address, what)
    port = None if port_text == "*" else line.integer(port_text, f"{what} port")
    return Endpoint(address, port, interface)


def _check_address(line: _Line, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address], address: str,
                   what: str) -> None:
    try:
        kind(address)
    except ValueError:
        raise line.bad(f"{what} {address!r} is not an {kind.__name__[:4]} address") from None


class _Details:
    """The fields after the addresses: -e details, skmem, and (TCP) everything tcp_stats_print() adds."""

    def __init__(self, line: _Line, tokens: list[str], unix: bool) -> None:
        self.line = line
        self.uid: int | None = None
        self.inode: int | None = None
        self.cookie: int | None = None
        self.v6only: bool | None = None
        self.shutdown: str | None = None
        self.timer: str | None = None
        self.cgroup: str | None = None
        self.skmem: SkMem | None = None
        self.vfs_inode: int | None = None
        self.vfs_dev: str | None = None
        self.pending: tuple[int, ...] = ()
        self.tcp_tokens: list[str] = []
        self.tcp_fields: dict[str, str] = {}
        self.tcp_flags: list[str] = []
        self.congestion = ""
        index = 0
        while index < len(tokens):
            token = tokens[index]
            index += 1
            if self.skmem is not None and not unix:
                # Past skmem only tcp_show_info() prints: collect it for _tcp_info().
                self.tcp_tokens.append(token)
                continue
            key, colon, value = token.partition(":")
            if colon and not value and key != "peers":
                raise line.cut(f"{token!r} has no value")
            if _SHUTDOWN.match(token):
                self.shutdown = token
            elif key == "skmem":
                self.skmem = _skmem(line, token)
            elif key == "timer" and colon:
                if not (value.startswith("(") and value.endswith(")")):
                    raise line.cut(f"timer {token!r} is not closed")
                self.timer = value
            elif unix and key == "peers" and colon and not value:
                # sk_diag_dump_icons(): inodes of embryo sockets queued on a listener, to the end of the line.
                rest = tokens[index:]
                self.pending = tuple(line.integer(t, "pending peer inode") for t in rest)
                index = len(tokens)
            elif unix and key == "ino" and colon:
                self.vfs_inode = line.integer(value, "vfs inode")
            elif unix and key == "dev" and colon:
                if not re.fullmatch(r"\d+/\d+", value):
                    raise line.cut(f"dev {value!r} is not major/minor")
                self.vfs_dev = value
            elif not unix and key == "uid" and colon:
                self.uid = line.integer(value, "uid")
            elif not unix and key == "ino" and colon:
                self.inode = line.integer(value, "inode")
            elif not unix and key == "sk" and colon:
                if not re.fullmatch(r"[0-9a-f]+", value):
                    raise line.cut(f"socket cookie sk:{value!r} is not hexadecimal")
                self.cookie = int(value, 16)
            elif not unix and key == "v6only" and colon:
                if value not in ("0", "1"):
                    raise line.bad(f"v6only:{value!r} is neither 0 nor 1")
                self.v6only = value == "1"
            elif not unix and key in ("cgroup", "fwmark") and colon:
                if not value:
                    raise line.cut(f"{key}: has no value")
                if key == "cgroup":
                    self.cgroup = value
            else:
                raise line.bad(f"unexpected field {token!r} before skmem:(…)")
        if self.tcp_tokens:
            self._split_tcp(self.tcp_tokens)

    def _split_tcp(self, tokens: list[str]) -> None:
        line = self.line
        index = 0
        while index < len(tokens):
            token = tokens[index]
            index += 1
            if token in TCP_SPACED_FIELDS or (token.endswith(":") and len(token) > 1):
                # "send 207460036bps", "pacing_rate 1bps/2bps"; the TLS ULP prints "rxconf: sw".
                if index >= len(tokens):
                    raise line.cut(f"{token!r} has no value")
                self.tcp_fields[token.rstrip(":")] = tokens[index]
                index += 1
            elif ":" in token:
                key, _, value = token.partition(":")
                if not value:
                    raise line.cut(f"{token!r} has no value")
                self.tcp_fields[key] = value
            else:
                if not self.congestion and not self.tcp_fields and token not in TCP_OPTION_WORDS:
                    self.congestion = token  # INET_DIAG_CONG, printed right after the option words
                else:
                    self.tcp_flags.append(token)


def _skmem(line: _Line, token: str) -> SkMem:
    match = _SKMEM.match(token)
    if match is None:
        raise line.cut(f"{token!r} is not a closed skmem:(…) group")
    values: dict[str, int] = {}
    for item in match["body"].split(","):
        part = _SKMEM_ITEM.match(item)
        if part is None:
            raise line.bad(f"skmem item {item!r} is not <letters><number>")
        values[part["letters"]] = int(part["value"])
    if tuple(values) != SkMem.LETTERS:
        raise line.bad(f"skmem has {','.join(values)}; expected {','.join(SkMem.LETTERS)} "
                       "(SK_MEMINFO_RMEM_ALLOC … SK_MEMINFO_DROPS, all nine since Linux 4.7)")
    return SkMem(*values.values())


def _tcp_info(line: _Line, details: _Details) -> TcpInfo:
    fields = details.tcp_fields
    typed: dict[str, Any] = {}  # TcpInfo field -> int or float, by the table it came from
    for key, (attr, kind) in _TCP_NUMBERS.items():
        if key in fields:
            typed[attr] = _number(line, key, fields[key], kind)
    if "rtt" in fields:
        typed["rtt_ms"], typed["rttvar_ms"] = _pair(line, "rtt", fields["rtt"], float)
    if "retrans" in fields:  # retrans:<retrans_out>/<total_retrans>
        typed["retrans"], typed["retrans_total"] = _pair(line, "retrans", fields["retrans"], int)
    for key, attr in _TCP_RATES.items():
        if key in fields:
            rate = fields[key].split("/")[0]  # pacing_rate may add "/<max>bps"
            if not rate.endswith("bps"):
                raise line.bad(f"{key} {fields[key]!r} does not end in bps")
            typed[attr] = _number(line, key, rate[:-3], int)
    return TcpInfo(congestion=details.congestion, app_limited="app_limited" in details.tcp_flags,
                   flags=frozenset(details.tcp_flags), fields=FrozenDict(fields), **typed)


def _number(line: _Line, key: str, text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise line.bad(f"{key}:{text!r} is not a number") from None


def _pair(line: _Line, key: str, text: str, kind: type) -> tuple:
    first, slash, second = text.partition("/")
    if not slash or not second:
        raise line.cut(f"{key}:{text!r} should be two numbers separated by /")
    return _number(line, key, first, kind), _number(line, key, second, kind)
