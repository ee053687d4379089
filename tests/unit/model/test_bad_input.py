"""Bad input: unknown fds, wrong types, out-of-range values give kernel errnos, never tracebacks."""

import pytest

from harness.model import Network

from model_helpers import tcp


@pytest.fixture
def lax():
    net = Network(strict=False)
    return net.add_host("h", addrs=["198.51.100.1"])


@pytest.mark.parametrize("op", ["bind", "listen", "accept", "connect", "shutdown", "getsockname",
                                "getpeername", "setsockopt", "getsockopt", "send", "recv", "close"])
def test_unknown_fd_is_ebadf(lax, op):
    """Rule: fdget fails for descriptors that are not open -> EBADF."""
    r = lax.call(op, {"fd": 99, "addr": ("0.0.0.0", 1), "backlog": 1, "how": 0, "level": 1, "optname": 2,
                      "value": 1})
    assert r.errno == "EBADF"


@pytest.mark.parametrize("fd", ["3", 3.0, None, [3]])
def test_non_integer_fd_is_ebadf(lax, fd):
    """A descriptor that is not an int cannot name an open file -> EBADF."""
    assert lax.call("listen", {"fd": fd, "backlog": 1}).errno == "EBADF"


def test_terminal_fd_is_enotsock(lax):
    """Rule: sockfd_lookup_light (sock_from_file, inlined): fds 0-2 are open but are not sockets -> ENOTSOCK."""
    assert lax.call("bind", {"fd": 0, "addr": ("0.0.0.0", 1)}).errno == "ENOTSOCK"
    assert lax.call("accept", {"fd": 1}).errno == "ENOTSOCK"


def test_shutdown_bad_how(lax):
    """Rule: inet_shutdown: how outside 0..2 -> EINVAL."""
    fd = tcp(lax)
    assert lax.call("shutdown", {"fd": fd, "how": 3}).errno == "EINVAL"
    assert lax.call("shutdown", {"fd": fd, "how": -1}).errno == "EINVAL"


def test_shutdown_unconnected_is_enotconn(lax):
    """Rule: inet_shutdown in TCP_CLOSE -> ENOTCONN."""
    assert lax.call("shutdown", {"fd": tcp(lax), "how": 2}).errno == "ENOTCONN"


@pytest.mark.parametrize("addr", [("not-an-ip", 80), ("0.0.0.0", 70000), ("0.0.0.0", -1), 42, ("x",)])
def test_malformed_addresses(lax, addr):
    """Malformed socket addresses never reach the protocol: EINVAL."""
    assert lax.call("bind", {"fd": tcp(lax), "addr": addr}).errno == "EINVAL"


def test_missing_address_is_efault(lax):
    """A NULL sockaddr faults in move_addr_to_kernel -> EFAULT."""
    assert lax.call("bind", {"fd": tcp(lax)}).errno == "EFAULT"


def test_non_integer_arguments(lax):
    """Arguments that are not integers (nor constant names) are EINVAL."""
    assert lax.call("socket", {"family": "banana", "type": 1}).errno == "EINVAL"
    assert lax.call("socket", {"family": 2.5, "type": 1}).errno == "EINVAL"
    assert lax.call("listen", {"fd": tcp(lax), "backlog": "many"}).errno == "EINVAL"
    assert lax.call("socket", {"type": 1}).errno == "EINVAL"


def test_constant_names_are_accepted(lax):
    """The entry point resolves constant names, including OR-ed flags."""
    r = lax.call("socket", {"family": "AF_INET", "type": "SOCK_STREAM|SOCK_NONBLOCK"})
    assert r.ok and lax.socket(r.ret).nonblock


def test_wide_backlog_is_truncated_like_a_c_int(lax):
    """A backlog wider than int wraps as the C ABI would (2**32 + 5 -> 5)."""
    fd = tcp(lax)
    assert lax.call("listen", {"fd": fd, "backlog": 2**32 + 5}).ok
    assert lax.socket(fd).max_ack_backlog == 5


def test_negative_lengths(lax):
    """A negative length is a huge size_t: the buffer cannot be accessed -> EFAULT."""
    fd = tcp(lax)
    assert lax.call("send", {"fd": fd, "length": -1}).errno == "EFAULT"
    assert lax.call("recv", {"fd": fd, "length": -1}).errno == "EFAULT"


def test_unknown_syscall_and_user(lax):
    """Unknown ops are ENOSYS; an unknown user has no process (ESRCH)."""
    assert lax.call("frobnicate", {}).errno == "ENOSYS"
    assert lax.call("socket", {"family": 2, "type": 1}, user="mallory").errno == "ESRCH"


def test_unknown_sockopt(lax):
    """Rule: unmodelled or unknown options are ENOPROTOOPT; read-only ones too."""
    fd = tcp(lax)
    assert lax.call("setsockopt", {"fd": fd, "level": 1, "optname": 999, "value": 1}).errno == "ENOPROTOOPT"
    assert lax.call("setsockopt", {"fd": fd, "level": 1, "optname": 4, "value": 1}).errno == "ENOPROTOOPT"
    assert lax.call("getsockopt", {"fd": fd, "level": 1, "optname": 32}).errno == "ENOPROTOOPT"
    assert lax.call("setsockopt", {"fd": fd, "level": 1, "optname": 7, "value": 1, "optlen": -1}).errno == "EINVAL"


def test_garbage_never_raises(lax):
    """Whatever the arguments, call() returns a Result."""
    for args in ({"fd": {}}, {"fds": "x"}, {"fd": 3, "addr": {"family": "x"}}, {"fd": 3, "data": 5}):
        for op in ("bind", "poll", "send", "connect", "setsockopt"):
            r = lax.call(op, args)
            assert r.errno is not None
