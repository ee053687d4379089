"""/proc/net and sysctl parsers on files read from the lab guest (kernel 6.1.0-56-cloud-amd64)."""

from __future__ import annotations

import pytest

from harness.stats import Origin, PortRange, StatsFormatError, StatsTruncatedError, TcpMem
from harness.stats import procnet
from harness.stats.collect import PROCFS_FILES
from harness.stats.sysctl import SYSCTLS, parse_sysctl_value, parse_sysctls

from .helpers import fixture, section_of

NETSTAT = Origin("server", "busybox grep -H '' /proc/net/netstat")


def test_netstat_groups_and_listen_counters():
    counters = procnet.parse_mib(fixture("proc-net-netstat-backlog.txt"), NETSTAT, ("TcpExt", "IpExt"))
    groups = {name.split(".")[0] for name in counters}
    assert groups == {"TcpExt", "IpExt", "MPTcpExt"}
    # The backlog workload refused handshakes: both counters moved (tcp_v4_syn_recv_sock's exit_overflow).
    assert counters["TcpExt.ListenOverflows"] > 0 and counters["TcpExt.ListenDrops"] >= counters["TcpExt.ListenOverflows"]
    assert counters["IpExt.InOctets"] > 0 and "MPTcpExt.MPCapableSYNRX" in counters


def test_snmp_keeps_signed_values():
    counters = procnet.parse_mib(fixture("proc-net-snmp.txt"), Origin("server", "snmp"), ("Ip", "Tcp", "Udp"))
    assert counters["Tcp.MaxConn"] == -1 and counters["Tcp.RtoMin"] == 200
    assert counters["Ip.Forwarding"] in (1, 2) and "UdpLite.InDatagrams" in counters


def test_sockstat_and_sockstat6():
    v4 = procnet.parse_sockstat(fixture("proc-net-sockstat.txt"), Origin("server", "sockstat"))
    v6 = procnet.parse_sockstat(fixture("proc-net-sockstat6.txt"), Origin("server", "sockstat6"))
    assert v4["sockets"]["used"] > 0 and v4["TCP"]["tw"] == 2 and "mem" in v4["TCP"]
    assert v4["FRAG"] == {"inuse": 0, "memory": 0}
    assert v6["TCP6"]["inuse"] > 0 and set(v6) == {"TCP6", "UDP6", "UDPLITE6", "RAW6", "FRAG6"}


def test_values_line_cut_short_is_truncation():
    text = fixture("proc-net-netstat.txt")
    values = text.splitlines()[1]
    cut = values.rsplit(" ", 5)[0]
    with pytest.raises(StatsTruncatedError) as caught:
        procnet.parse_mib(text.replace(values, cut), NETSTAT)
    assert caught.value.line_number == 2 and caught.value.line == cut
    assert "names but only" in str(caught.value) and "server: `busybox grep -H '' /proc/net/netstat`" in str(caught.value)


def test_names_without_values_and_missing_groups():
    first_two = "\n".join(fixture("proc-net-netstat.txt").splitlines()[:3]) + "\n"
    with pytest.raises(StatsTruncatedError, match="no values line"):
        procnet.parse_mib(first_two, NETSTAT)
    only_tcpext = "\n".join(fixture("proc-net-netstat.txt").splitlines()[:2]) + "\n"
    with pytest.raises(StatsTruncatedError, match="no IpExt"):
        procnet.parse_mib(only_tcpext, NETSTAT, ("TcpExt", "IpExt"))


@pytest.mark.parametrize("text, problem", [
    ("TcpExt: A B\nIpExt: 1 2\n", "values line of TcpExt"),
    ("TcpExt: A B\nTcpExt: 1 x\n", "'x' is not an integer"),
    ("TcpExt A B\nTcpExt: 1 2\n", "expected '<Group>"),
    ("TcpExt: A\nTcpExt: 1 2\n", "values but only 1 names"),
])
def test_mib_format_errors(text, problem):
    with pytest.raises(StatsFormatError, match=problem):
        procnet.parse_mib(text, NETSTAT)


@pytest.mark.parametrize("text, error", [
    ("TCP: inuse 1 orphan\n", StatsTruncatedError),
    ("TCP: inuse one\n", StatsFormatError),
    ("", StatsTruncatedError),
])
def test_sockstat_errors(text, error):
    with pytest.raises(error):
        procnet.parse_sockstat(text, Origin("server", "sockstat"))


def test_grep_output_is_split_back_into_files():
    recorded = section_of(fixture("snapshot-server-mixed.txt"), "procfs")
    files = procnet.split_grep_h(recorded, PROCFS_FILES, Origin("server", "grep"))
    assert set(files) == set(PROCFS_FILES)
    assert files["/proc/net/sockstat"].startswith("sockets: used ")
    assert files["/proc/sys/net/ipv4/tcp_rmem"].count("\t") == 2


def test_grep_output_missing_a_file_or_with_a_stranger():
    recorded = section_of(fixture("snapshot-server-mixed.txt"), "procfs")
    without = "\n".join(line for line in recorded.splitlines() if not line.startswith("/proc/net/snmp:")) + "\n"
    with pytest.raises(StatsTruncatedError, match="nothing read from /proc/net/snmp"):
        procnet.split_grep_h(without, PROCFS_FILES, Origin("server", "grep"))
    with pytest.raises(StatsFormatError, match="expected '<file>:<line>'"):
        procnet.split_grep_h(recorded + "grep: /proc/net/nope: No such file or directory\n", PROCFS_FILES,
                             Origin("server", "grep"))


def test_sysctls_are_typed():
    recorded = section_of(fixture("snapshot-server-mixed.txt"), "procfs")
    files = procnet.split_grep_h(recorded, PROCFS_FILES, Origin("server", "grep"))
    sysctls = parse_sysctls(files, lambda path: Origin("server", path))
    assert sysctls.somaxconn == 4096 and sysctls.optmem_max > 0
    assert sysctls.tcp_rmem == TcpMem(4096, 131072, sysctls.tcp_rmem.max) and sysctls.tcp_rmem.max > 131072
    assert sysctls.ip_local_port_range == PortRange(32768, 60999) and 40000 in sysctls.ip_local_port_range
    assert sysctls.ip_nonlocal_bind is False and sysctls.tcp_abort_on_overflow is False
    assert sysctls.tcp_syncookies == 1 and sysctls.ip_unprivileged_port_start == 1024
    assert sysctls.get("net.core.somaxconn") == 4096 and sysctls.get("tcp_wmem").default == 16384
    assert len(SYSCTLS) == 14


@pytest.mark.parametrize("name, text, error, problem", [
    ("net.ipv4.tcp_rmem", "4096\t131072\n", StatsTruncatedError, "2 of 3 values"),
    ("net.ipv4.ip_local_port_range", "32768\t60999\t1\n", StatsFormatError, "expected 2"),
    ("net.ipv4.ip_nonlocal_bind", "2\n", StatsFormatError, "not 0 or 1"),
    ("net.core.somaxconn", "lots\n", StatsFormatError, "not integers"),
])
def test_bad_sysctl_values(name, text, error, problem):
    spec = next(s for s in SYSCTLS if s.name == name)
    with pytest.raises(error, match=problem):
        parse_sysctl_value(spec, text, Origin("server", spec.path))
