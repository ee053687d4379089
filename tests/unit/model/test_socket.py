"""socket(): validation order flags -> family -> type -> protocol, proto_ops choice, file table (§3)."""

from harness.model.constants import (
    AF_INET, AF_INET6, AF_UNIX, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, O_NONBLOCK, S_IFSOCK, SOCK_CLOEXEC,
    SOCK_DGRAM, SOCK_NONBLOCK, SOCK_RAW, SOCK_SEQPACKET, SOCK_STREAM,
)


def sock(host, family, type_, protocol=0, user="root"):
    return host.call("socket", {"family": family, "type": type_, "protocol": protocol}, user=user)


def test_unknown_flag_bits_are_einval_before_family_is_checked(a):
    """Rule: __sys_socket_create rejects flag bits outside SOCK_NONBLOCK|SOCK_CLOEXEC first."""
    r = sock(a, 999, SOCK_STREAM | 0x100)
    assert r.errno == "EINVAL" and r.kernel_fn == "__sys_socket_create"


def test_family_out_of_range_is_eafnosupport_before_type(a):
    """Rule: __sock_create checks family < NPROTO before the type range."""
    r = sock(a, 46, 15)
    assert r.errno == "EAFNOSUPPORT" and r.kernel_fn == "__sock_create"
    assert sock(a, -1, SOCK_STREAM).errno == "EAFNOSUPPORT"


def test_type_out_of_range_is_einval(a):
    """Rule: __sock_create: type >= SOCK_MAX -> EINVAL."""
    r = sock(a, AF_INET, 11)
    assert r.errno == "EINVAL" and r.kernel_fn == "__sock_create"


def test_protocol_mismatch_is_eprotonosupport(a):
    """Rule: inet_create walks inetsw[type]; no matching protocol -> EPROTONOSUPPORT."""
    assert sock(a, AF_INET, SOCK_STREAM, IPPROTO_UDP).errno == "EPROTONOSUPPORT"
    assert sock(a, AF_INET, SOCK_DGRAM, IPPROTO_TCP).errno == "EPROTONOSUPPORT"


def test_type_without_protocols_is_esocktnosupport(a):
    """Rule: inet_create: an empty inetsw[type] list (SOCK_SEQPACKET without SCTP) -> ESOCKTNOSUPPORT."""
    assert sock(a, AF_INET, SOCK_SEQPACKET).errno == "ESOCKTNOSUPPORT"


def test_protocol_out_of_ipproto_range_is_einval(a):
    """Rule: inet_create rejects protocol < 0 or >= IPPROTO_MAX with EINVAL."""
    assert sock(a, AF_INET, SOCK_STREAM, 263).errno == "EINVAL"
    assert sock(a, AF_INET, SOCK_STREAM, -1).errno == "EINVAL"


def test_raw_needs_cap_net_raw(a):
    """Rule: inet_create: SOCK_RAW without CAP_NET_RAW -> EPERM."""
    r = sock(a, AF_INET, SOCK_RAW, IPPROTO_ICMP, user="student")
    assert r.errno == "EPERM"
    assert sock(a, AF_INET, SOCK_RAW, IPPROTO_ICMP).ok


def test_raw_with_protocol_zero_is_eprotonosupport(a):
    """Rule: the SOCK_RAW wildcard entry does not match protocol 0 (inet_create)."""
    assert sock(a, AF_INET, SOCK_RAW, 0).errno == "EPROTONOSUPPORT"


def test_cap_can_be_granted_explicitly(a):
    """Users can be given single capabilities."""
    a.add_user("pinger", 1001, {13})
    assert sock(a, AF_INET, SOCK_RAW, IPPROTO_ICMP, user="pinger").ok


def test_ping_socket_obeys_ping_group_range(a, net):
    """Rule: ping_init_sock: gid outside net.ipv4.ping_group_range -> EACCES."""
    assert sock(a, AF_INET, SOCK_DGRAM, IPPROTO_ICMP).errno == "EACCES"
    c = net.add_host("c", sysctls={"ping_group_range": "0 2147483647"})
    assert sock(c, AF_INET, SOCK_DGRAM, IPPROTO_ICMP).ok


def test_proto_ops_tables(a):
    """Rule: TCP gets inet_stream_ops, UDP inet_dgram_ops (so listen/accept on UDP fall to sock_no_*)."""
    r = sock(a, AF_INET, SOCK_STREAM)
    assert "inet_stream_ops" in r.rule
    r = sock(a, AF_INET, SOCK_DGRAM)
    assert "inet_dgram_ops" in r.rule
    r = sock(a, AF_INET6, SOCK_STREAM, IPPROTO_TCP)
    assert "inet6_stream_ops" in r.rule


def test_fds_start_at_3_and_reuse_lowest(a):
    """Rule: get_unused_fd_flags gives the lowest free number; 0-2 are the terminal."""
    assert sock(a, AF_INET, SOCK_STREAM).ret == 3
    assert sock(a, AF_INET, SOCK_STREAM).ret == 4
    assert a.call("close", {"fd": 3}).ok
    assert sock(a, AF_INET, SOCK_STREAM).ret == 3


def test_processes_are_per_user(a):
    """One process per host per user: each has its own descriptor table."""
    assert sock(a, AF_INET, SOCK_STREAM).ret == 3
    assert sock(a, AF_INET, SOCK_STREAM, user="student").ret == 3


def test_file_flags_and_inode(a):
    """Rule: sock_map_fd applies O_NONBLOCK/O_CLOEXEC; the file is S_IFSOCK, named socket:[inode]."""
    fd = sock(a, AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC).ret
    view = a.socket(fd)
    assert view.nonblock and view.cloexec
    assert view.st_mode & 0o170000 == S_IFSOCK
    assert view.proc_link == f"socket:[{view.inode}]"
    assert a.call("fcntl", {"fd": fd, "cmd": 3}).ret & O_NONBLOCK
    st = a.call("fstat", {"fd": fd}).ret
    assert st["st_ino"] == view.inode and st["link"].startswith("socket:[")


def test_initial_states(a):
    """Rule: inet_create sets SS_UNCONNECTED; a new sock is TCP_CLOSE."""
    fd = sock(a, AF_INET, SOCK_STREAM).ret
    view = a.socket(fd)
    assert view.ss_state == "SS_UNCONNECTED" and view.sk_state == "CLOSE"


def test_unix_protocol_and_type_checks(a):
    """Rule: unix_create: protocol other than 0/PF_UNIX -> EPROTONOSUPPORT; SOCK_RAW becomes SOCK_DGRAM."""
    assert sock(a, AF_UNIX, SOCK_STREAM, 5).errno == "EPROTONOSUPPORT"
    fd = sock(a, AF_UNIX, SOCK_RAW).ret
    assert a.socket(fd).type == SOCK_DGRAM
    assert sock(a, AF_UNIX, 4).errno == "ESOCKTNOSUPPORT"


def test_unregistered_family_is_eafnosupport(a):
    """Rule: __sock_create: no net_families[] entry -> EAFNOSUPPORT."""
    assert sock(a, 3, SOCK_STREAM).errno == "EAFNOSUPPORT"


def test_packet_socket_needs_cap_net_raw(a):
    """Rule: packet_create: AF_PACKET needs CAP_NET_RAW; (AF_INET, SOCK_PACKET) is turned into it."""
    assert sock(a, 17, SOCK_RAW, user="student").errno == "EPERM"
    assert sock(a, AF_INET, 10, user="student").errno == "EPERM"


def test_tcp_protocol_defaults(a):
    """Rule: protocol 0 picks the first inetsw entry: TCP for streams, UDP for datagrams."""
    fd = sock(a, AF_INET, SOCK_STREAM).ret
    assert a.call("getsockopt", {"fd": fd, "level": 1, "optname": 38}).ret == IPPROTO_TCP
    fd = sock(a, AF_INET, SOCK_DGRAM).ret
    assert a.call("getsockopt", {"fd": fd, "level": 1, "optname": 38}).ret == IPPROTO_UDP
