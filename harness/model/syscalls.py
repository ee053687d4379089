"""System-call entry points (net/socket.c): argument decoding, fd lookup, then the socket's proto_ops."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import create, epoll, poll as pollmod, sockopt
from .addr import SOCKADDR_STORAGE, parse_sockaddr
from .args import arg_int
from .constants import (
    AF_INET, AF_INET6, AF_MAX, AF_PACKET, AF_UNIX, O_NONBLOCK, S_IFSOCK, SOCK_CLOEXEC, SOCK_MAX, SOCK_NONBLOCK,
    SOCK_PACKET, SOCK_TYPE_MASK,
)
from .result import Result, fail
from .sock import OpenFile, Sock

if TYPE_CHECKING:
    from .host import Host, Process

from .constants import F_GETFD, F_GETFL, F_SETFD, F_SETFL  # noqa: E402 - the fcntl commands, named once
FD_CLOEXEC = 1
O_LARGEFILE = 0o100000  # x86_64's value; sockets never carry it, files opened on 64-bit always do


_FLAG_TEXT = {(False, False): "no flags", (True, False): "O_NONBLOCK", (False, True): "O_CLOEXEC",
              (True, True): "O_NONBLOCK|O_CLOEXEC"}


def sys_socket(host: "Host", proc: "Process", op: str, args: Mapping[str, Any]) -> Result:
    family = arg_int(args, "family")
    type_arg = arg_int(args, "type")
    protocol = arg_int(args, "protocol", 0)
    creds = proc.creds
    # __sys_socket_create(): flag bits first, then __sock_create() range checks.
    if (type_arg & ~SOCK_TYPE_MASK) & ~(SOCK_CLOEXEC | SOCK_NONBLOCK):
        raise fail("EINVAL", f"type {type_arg:#x} carries flag bits other than SOCK_NONBLOCK|SOCK_CLOEXEC",
                   "__sys_socket_create")
    sock_type = type_arg & SOCK_TYPE_MASK
    if family < 0 or family >= AF_MAX:
        raise fail("EAFNOSUPPORT", f"family {family} outside 0..{AF_MAX - 1}", "__sock_create")
    if sock_type >= SOCK_MAX:
        raise fail("EINVAL", f"type {sock_type} outside 0..{SOCK_MAX - 1}", "__sock_create")
    if family == AF_INET and sock_type == SOCK_PACKET:
        family = AF_PACKET  # __sock_create(): obsolete (PF_INET, SOCK_PACKET) becomes PF_PACKET
    kind = ""
    if family in (AF_INET, AF_INET6):
        ops, protocol, kind = create.inet_create(host, creds, family, sock_type, protocol)
    elif family == AF_UNIX:
        ops, sock_type = create.unix_create(sock_type, protocol)
    else:
        ops = create.opaque_create(creds, family, sock_type, protocol)
    sk = Sock(host, host.next_inode(), family, sock_type, protocol, ops, creds.uid)
    if host.sysctls.get("net.core.busy_read"):
        sk.ll_usec = host.sysctls["net.core.busy_read"]  # sock_init_data(): sk_ll_usec = sysctl_net_busy_read
    sysctls = host.sysctls
    if kind == "tcp":
        # tcp_init_sock(): TCP starts from tcp_wmem[1]/tcp_rmem[1]
        sk.sndbuf = sysctls["net.ipv4.tcp_wmem"][1]
        sk.rcvbuf = sysctls["net.ipv4.tcp_rmem"][1]
    else:
        # sock_init_data(): everyone else starts from wmem_default/rmem_default
        sk.sndbuf = sysctls["net.core.wmem_default"]
        sk.rcvbuf = sysctls["net.core.rmem_default"]
    if kind in ("raw", "ping"):
        sk.reuse = True  # INET_PROTOSW_REUSE
    if family == AF_INET6:
        sk.v6only = bool(sysctls["net.ipv6.bindv6only"])
    nonblock = bool(type_arg & SOCK_NONBLOCK)
    cloexec = bool(type_arg & SOCK_CLOEXEC)
    fd = proc.install(OpenFile(sk, nonblock, cloexec))
    flags = _FLAG_TEXT[nonblock, cloexec]
    return Result(op, fd, None, f"socket:[{sk.inode}] with {ops.name}/{ops.prot}, {flags}; sock_map_fd gave fd {fd}",
                  "__sys_socket")


def sys_bind(host, proc, op, args) -> Result:
    f = proc.lookup(args.get("fd"))
    sa = parse_sockaddr(args)
    return f.sock.ops.bind(op, host, proc.creds, f, sa)


def sys_listen(host, proc, op, args) -> Result:
    f = proc.lookup(args.get("fd"))
    backlog = arg_int(args, "backlog")
    somaxconn = host.sysctls["net.core.somaxconn"]
    clamped = backlog
    if (backlog & 0xFFFFFFFF) > somaxconn:
        clamped = somaxconn  # __sys_listen(): compared as unsigned, so a negative backlog means somaxconn
    return f.sock.ops.listen(op, host, proc.creds, f, clamped)


def sys_accept(host, proc, op, args) -> Result:
    flags = arg_int(args, "flags", 0) if op == "accept4" else 0
    if flags & ~(SOCK_CLOEXEC | SOCK_NONBLOCK):
        # __sys_accept4() takes the file (EBADF), then __sys_accept4_file() refuses the flags before
        # sock_from_file() asks whether it is a socket (measured: EINVAL, not ENOTSOCK, on fd 0).
        fd = args.get("fd")
        if type(fd) is not int or fd not in proc.fds:
            proc.lookup(fd)  # EBADF
        raise fail("EINVAL", f"accept4 flags {flags:#x} other than SOCK_NONBLOCK|SOCK_CLOEXEC", "__sys_accept4_file")
    f = proc.lookup(args.get("fd"))
    return f.sock.ops.accept(op, host, proc, f, flags)


def sys_connect(host, proc, op, args) -> Result:
    f = proc.lookup(args.get("fd"))
    sa = parse_sockaddr(args)
    return f.sock.ops.connect(op, host, proc.creds, f, sa)


def sys_close(host, proc, op, args) -> Result:
    fd = args.get("fd")
    if type(fd) is not int or fd not in proc.fds:
        raise fail("EBADF", f"fd {fd!r} is not open", "close_fd")
    entry = proc.release(fd)
    if not isinstance(entry, OpenFile):
        return Result(op, 0, None, f"closed fd {fd} (not a socket)", "close_fd")
    sk = entry.sock
    rule = sk.ops.release(host, sk)
    return Result(op, 0, None, f"closed fd {fd}: {rule}", "sock_close")


def sys_shutdown(host, proc, op, args) -> Result:
    f = proc.lookup(args.get("fd"))
    how = arg_int(args, "how")
    return f.sock.ops.shutdown(op, host, f, how)


def sys_getsockname(host, proc, op, args) -> Result:
    f = proc.lookup(args.get("fd"))
    return f.sock.ops.getname(op, host, f, False)


def sys_getpeername(host, proc, op, args) -> Result:
    f = proc.lookup(args.get("fd"))
    return f.sock.ops.getname(op, host, f, True)


def sys_setsockopt(host, proc, op, args) -> Result:
    f = proc.lookup(args.get("fd"))
    return sockopt.setsockopt(op, host, proc.creds, f, args)


def sys_getsockopt(host, proc, op, args) -> Result:
    f = proc.lookup(args.get("fd"))
    return sockopt.getsockopt(op, host, proc.creds, f, args)


def _payload(args: Mapping[str, Any]) -> bytes:
    data = args.get("data")
    if type(data) is bytes:
        return data
    if data is None:
        length = args.get("length", args.get("len", 0))
        if isinstance(length, bool) or not isinstance(length, int):
            raise fail("EINVAL", f"length {length!r} is not an integer", "model")
        if length < 0:
            raise fail("EFAULT", f"length {length} is a huge size_t: the buffer is not readable", "import_single_range")
        return bytes(length)
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise fail("EFAULT", f"data {type(data).__name__} is not a buffer", "import_single_range")


def sys_send(host, proc, op, args) -> Result:
    f = proc.lookup(args.get("fd"))
    payload = _payload(args)
    flags = arg_int(args, "flags", 0)
    if op == "sendmsg" and args.get("addr") is not None and type(args.get("addrlen")) is int:
        # __copy_msghdr(): msg_namelen above sizeof(struct sockaddr_storage) is clamped to it, and
        # a zero msg_namelen drops the name (measured: fuzz-1-93, fuzz-1-105); sendto() checks instead.
        namelen = args["addrlen"]
        if namelen == 0:
            args = {key: value for key, value in args.items() if key not in ("addr", "addrlen")}
        elif namelen > SOCKADDR_STORAGE:
            args = {**args, "addrlen": SOCKADDR_STORAGE}
    dest = parse_sockaddr(args) if args.get("addr") is not None else None
    return f.sock.ops.sendmsg(op, host, proc.creds, f, payload, flags, dest)


def sys_sendfile(host, proc, op, args) -> Result:
    """do_sendfile() -> splice to the socket: tcp_sendmsg()/udp_sendmsg() with the file's pages, never MSG_ZEROCOPY.

    The bytes come from the page cache, not from the caller, so nothing waits to be handed back:
    no notification reaches the error queue even on a socket with SO_ZEROCOPY.
    """
    f = proc.lookup(args.get("fd"))
    length = args.get("length")
    if type(length) is not int or length < 0:
        raise fail("EINVAL", f"length {length!r} must be a count of bytes", "do_sendfile")
    result = f.sock.ops.sendmsg(op, host, proc.creds, f, _payload({"length": length}), 0, None)
    if result.errno is None and not result.blocked:
        return Result(op, result.ret, None, f"{result.rule}; the pages are the file's (splice), so no "
                      "completion is queued: SO_ZEROCOPY does not apply", "do_sendfile", approx=result.approx)
    return result


def sys_recv(host, proc, op, args) -> Result:
    f = proc.lookup(args.get("fd"))
    length = args.get("length", args.get("len", 65536))
    if isinstance(length, bool) or not isinstance(length, int):
        raise fail("EINVAL", f"length {length!r} is not an integer", "model")
    if length < 0:
        raise fail("EFAULT", f"length {length} is a huge size_t: the buffer is not writable", "import_single_range")
    flags = arg_int(args, "flags", 0)
    return f.sock.ops.recvmsg(op, host, f, length, flags)


def sys_poll(host, proc, op, args) -> Result:
    return pollmod.do_poll(op, host, proc, args)


def sys_epoll_create1(host, proc, op, args) -> Result:
    return epoll.create(op, proc, args)


def sys_epoll_ctl(host, proc, op, args) -> Result:
    return epoll.ctl(op, proc, args)


def sys_epoll_wait(host, proc, op, args) -> Result:
    return epoll.wait(op, proc, args, host.net)


def sys_epoll_herd(host, proc, op, args) -> Result:
    return epoll.herd(op, proc, args)


def sys_epoll_herd_wakeups(host, proc, op, args) -> Result:
    return epoll.herd_wakeups(op, proc, args)


def sys_fcntl(host, proc, op, args) -> Result:
    fd = args.get("fd")
    if type(fd) is not int or fd not in proc.fds:
        raise fail("EBADF", f"fd {fd!r} is not open", "fdget_raw")
    entry = proc.fds[fd]
    cmd = arg_int(args, "cmd")
    if not isinstance(entry, OpenFile):
        # fds 0-2: a terminal (the agent: /dev/null) opened O_RDWR, which the kernel marks O_LARGEFILE.
        flags = proc.tty_flags.setdefault(fd, [False, False])  # [O_NONBLOCK, FD_CLOEXEC]
        if cmd == F_GETFL:
            return Result(op, 0o2 | O_LARGEFILE | (O_NONBLOCK if flags[0] else 0), None,
                          "O_RDWR|O_LARGEFILE (force_o_largefile) plus status flags", "do_fcntl")
        if cmd == F_GETFD:
            return Result(op, FD_CLOEXEC if flags[1] else 0, None,
                          "FD_CLOEXEC set" if flags[1] else "inherited without FD_CLOEXEC", "do_fcntl")
        if cmd == F_SETFL:
            flags[0] = bool(arg_int(args, "arg", 0) & O_NONBLOCK)
            return Result(op, 0, None, f"O_NONBLOCK {'set' if flags[0] else 'cleared'} on a non-socket", "setfl")
        if cmd == F_SETFD:
            flags[1] = bool(arg_int(args, "arg", 0) & FD_CLOEXEC)
            return Result(op, 0, None, f"FD_CLOEXEC {'set' if flags[1] else 'cleared'} on a non-socket", "do_fcntl")
        raise fail("EINVAL", f"fcntl command {cmd} is not modelled", "do_fcntl")
    if cmd == F_GETFL:
        return Result(op, 0o2 | (O_NONBLOCK if entry.nonblock else 0), None, "O_RDWR plus status flags", "do_fcntl")
    if cmd == F_SETFL:
        entry.nonblock = bool(arg_int(args, "arg", 0) & O_NONBLOCK)
        return Result(op, 0, None, f"O_NONBLOCK {'set' if entry.nonblock else 'cleared'}", "setfl")
    if cmd == F_GETFD:
        return Result(op, FD_CLOEXEC if entry.cloexec else 0, None, "descriptor flags", "do_fcntl")
    if cmd == F_SETFD:
        entry.cloexec = bool(arg_int(args, "arg", 0) & FD_CLOEXEC)
        return Result(op, 0, None, f"FD_CLOEXEC {'set' if entry.cloexec else 'cleared'}", "do_fcntl")
    raise fail("EINVAL", f"fcntl command {cmd} is not modelled", "do_fcntl")


def sys_fstat(host, proc, op, args) -> Result:
    f = proc.lookup(args.get("fd"))
    # The same keys as the guest agent's fstat: "mode"/"ino" and the struct stat names.
    info = {"mode": S_IFSOCK | 0o777, "ino": f.sock.inode, "st_mode": S_IFSOCK | 0o777, "st_ino": f.sock.inode,
            "link": f"socket:[{f.sock.inode}]"}
    # fstat() copies what sock_alloc() put in the sockfs inode; vfs_getattr_nosec() is where the traced
    # guests read it (sock_alloc itself runs at socket(), not here).
    return Result(op, info, None, "sockfs inode from sock_alloc: S_IFSOCK, named socket:[inode] in /proc/PID/fd",
                  "vfs_getattr_nosec")


def sys_unlink(host, proc, op, args) -> Result:
    path = args.get("path")
    if not isinstance(path, str) or path.startswith("@") or path not in host.unix_names:
        raise fail("ENOENT", f"no file {path!r}", "do_unlinkat")
    del host.unix_names[path]
    return Result(op, 0, None, f"removed {path}; a socket bound to it keeps working but cannot be found by name",
                  "do_unlinkat")


def sys_sysctl_get(host, proc, op, args) -> Result:
    """Not a system call: reading /proc/sys/<name> (anyone may read the net sysctls the model keeps)."""
    from .config import _canonical_key

    name = args.get("name")
    try:
        key = _canonical_key(name) if isinstance(name, str) and name else None
    except KeyError:
        key = None
    if key is None or key != str(name).replace("/", "."):
        raise fail("ENOENT", f"no sysctl {name!r} in the model", "proc_sys_lookup")
    value = host.sysctls[key]
    return Result(op, list(value) if isinstance(value, tuple) else value, None, f"{key} reads {value}",
                  "proc_sys_call_handler")


SYSCALLS: dict[str, Callable[..., Result]] = {
    "socket": sys_socket,
    "bind": sys_bind,
    "listen": sys_listen,
    "accept": sys_accept,
    "accept4": sys_accept,
    "connect": sys_connect,
    "close": sys_close,
    "shutdown": sys_shutdown,
    "getsockname": sys_getsockname,
    "getpeername": sys_getpeername,
    "setsockopt": sys_setsockopt,
    "getsockopt": sys_getsockopt,
    "send": sys_send,
    "sendto": sys_send,
    "sendmsg": sys_send,
    "sendfile": sys_sendfile,
    "recv": sys_recv,
    "recvfrom": sys_recv,
    "recvmsg": sys_recv,
    "poll": sys_poll,
    "epoll_create1": sys_epoll_create1,
    "epoll_ctl": sys_epoll_ctl,
    "epoll_wait": sys_epoll_wait,
    "epoll_herd": sys_epoll_herd,  # not a system call: the guest agent's waiters (harness/guest/inside/agent.py Herd)
    "epoll_herd_wakeups": sys_epoll_herd_wakeups,
    "fcntl": sys_fcntl,
    "fstat": sys_fstat,
    "unlink": sys_unlink,
    "sysctl_get": sys_sysctl_get,
}
