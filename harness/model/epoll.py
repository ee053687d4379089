"""epoll(7): an interest list per epoll file, level- and edge-triggered reports, EPOLLONESHOT, EPOLLEXCLUSIVE.

fs/eventpoll.c keeps, per epoll file, one ``epitem`` per (file, fd) and a
ready list that wakeups (``ep_poll_callback``) feed. ``ep_send_events()``
reports an item when its file's poll mask meets its events; a level-triggered
item goes back on the ready list, an edge-triggered one only at the next
wakeup, and an EPOLLONESHOT item is disarmed (``events &= EP_PRIVATE_BITS``)
until EPOLL_CTL_MOD. The model has no wakeups of its own, so it takes one
to have happened when, since it last looked, the socket received data, its
accept queue grew, or its mask gained a bit (it became writable, say).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from .constants import (
    EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLERR, EPOLLET, EPOLLEXCLUSIVE, EPOLLHUP,
    EPOLLIN, EPOLLONESHOT, EPOLLOUT, EPOLLWAKEUP,
)
from .result import Result, fail
from .sock import OpenFile

if TYPE_CHECKING:
    from .host import Process
    from .network import Network

# EP_PRIVATE_BITS: what an EPOLLONESHOT item keeps once it has fired.
PRIVATE_BITS = EPOLLWAKEUP | EPOLLONESHOT | EPOLLET | EPOLLEXCLUSIVE
# EPOLLEXCLUSIVE_OK_BITS: the only bits EPOLLEXCLUSIVE may come with.
EXCLUSIVE_OK = EPOLLIN | EPOLLOUT | EPOLLERR | EPOLLHUP | EPOLLWAKEUP | EPOLLET | EPOLLEXCLUSIVE


@dataclass
class Item:
    """One epitem: the registered file, its events, and what the model saw of it last."""

    file: OpenFile
    events: int
    pending: bool = False
    seen: tuple[int, int, int] = (0, 0, 0)


@dataclass
class EpollFile:
    """An epoll instance: what ``epoll_create1()`` returns a descriptor for."""

    cloexec: bool
    items: dict[int, Item] = field(default_factory=dict)


def _state(file: OpenFile) -> tuple[int, int, int]:
    sk = file.sock
    return len(sk.rx) if hasattr(sk.rx, "__len__") else 0, len(sk.accept_queue), sk.ops.poll(sk)


def _woken(item: Item) -> bool:
    """Whether a wakeup happened since the model last looked: data, a new connection, or a new mask bit."""
    rx, queued, mask = _state(item.file)
    old_rx, old_queued, old_mask = item.seen
    return rx > old_rx or queued > old_queued or bool(mask & ~old_mask)


def create(op: str, proc: "Process", args: Mapping[str, Any]) -> Result:
    flags = int(args.get("flags", 0) or 0)
    if flags & ~EPOLL_CLOEXEC:
        raise fail("EINVAL", f"flags {flags:#x} other than EPOLL_CLOEXEC", "do_epoll_create")
    fd = proc.install(EpollFile(bool(flags & EPOLL_CLOEXEC)))  # type: ignore[arg-type]
    return Result(op, fd, None, f"eventpoll file on fd {fd}", "do_epoll_create")


def _epoll(proc: "Process", fd: Any, where: str) -> EpollFile:
    entry = proc.fds.get(fd) if type(fd) is int else None
    if entry is None:
        raise fail("EBADF", f"fd {fd!r} is not open", where)
    if not isinstance(entry, EpollFile):
        raise fail("EINVAL", f"fd {fd} is not an epoll file", where)
    return entry


def ctl(op: str, proc: "Process", args: Mapping[str, Any]) -> Result:
    epfd, cmd, fd = args.get("epfd"), args.get("op"), args.get("fd")
    events = int(args.get("events", 0) or 0) & 0xFFFFFFFF
    ep = _epoll(proc, epfd, "do_epoll_ctl")
    target = proc.fds.get(fd) if type(fd) is int else None
    if target is None:
        raise fail("EBADF", f"fd {fd!r} is not open", "do_epoll_ctl")
    if target is ep:
        raise fail("EINVAL", "an epoll file cannot watch itself", "do_epoll_ctl")
    if not isinstance(target, (OpenFile, EpollFile)):
        raise fail("EPERM", f"fd {fd} does not support poll (the model watches sockets only)", "do_epoll_ctl")
    if cmd in (EPOLL_CTL_ADD, EPOLL_CTL_MOD) and events & EPOLLEXCLUSIVE:
        if cmd == EPOLL_CTL_MOD:
            raise fail("EINVAL", "EPOLLEXCLUSIVE cannot be given to EPOLL_CTL_MOD", "do_epoll_ctl")
        if events & ~EXCLUSIVE_OK or isinstance(target, EpollFile):
            raise fail("EINVAL", "EPOLLEXCLUSIVE comes only with IN/OUT/ERR/HUP/WAKEUP/ET, on a non-epoll file",
                       "do_epoll_ctl")
    if not isinstance(target, OpenFile):
        raise fail("EINVAL", "the model does not nest epoll files", "do_epoll_ctl")
    item = ep.items.get(fd)
    if cmd not in (EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD):
        # do_epoll_ctl(): error = -EINVAL before the switch, whether or not the file is watched
        raise fail("EINVAL", f"op {cmd!r} is not EPOLL_CTL_ADD, _DEL or _MOD", "do_epoll_ctl")
    if cmd == EPOLL_CTL_ADD:
        if item is not None and item.file is target:
            raise fail("EEXIST", f"fd {fd} is already in the interest list", "ep_insert")
        # ep_insert(): a file that is ready at once goes straight on the ready list.
        ep.items[fd] = Item(target, events | EPOLLERR | EPOLLHUP, pending=True, seen=_state(target))
        return Result(op, 0, None, f"fd {fd} added with events {events:#x}", "ep_insert")
    if item is None or item.file is not target:
        raise fail("ENOENT", f"fd {fd} is not in the interest list", "do_epoll_ctl")
    if cmd == EPOLL_CTL_DEL:
        del ep.items[fd]
        return Result(op, 0, None, f"fd {fd} removed", "ep_remove")
    if cmd == EPOLL_CTL_MOD:
        if item.events & EPOLLEXCLUSIVE:
            raise fail("EINVAL", "an EPOLLEXCLUSIVE item cannot be modified", "do_epoll_ctl")
        item.events, item.pending, item.seen = events | EPOLLERR | EPOLLHUP, True, _state(target)
        return Result(op, 0, None, f"fd {fd} re-armed with events {events:#x}", "ep_modify")
    raise fail("EINVAL", f"op {cmd!r} is not EPOLL_CTL_ADD, _DEL or _MOD", "do_epoll_ctl")


def _would_report(proc: "Process", ep: EpollFile) -> bool:
    """Whether ep_poll() would find an event now; like the scan in ``wait``, but changes nothing."""
    for fd, item in ep.items.items():
        if proc.fds.get(fd) is not item.file:
            continue
        if item.events & EPOLLET and not (item.pending or _woken(item)):
            continue
        if item.file.sock.ops.poll(item.file.sock) & item.events & ~PRIVATE_BITS:
            return True
    return False


def wait(op: str, proc: "Process", args: Mapping[str, Any], net: "Network") -> Result:
    ep = _epoll(proc, args.get("epfd"), "do_epoll_wait")
    maxevents = args.get("maxevents", 16)
    timeout = args.get("timeout", 0)
    if type(maxevents) is not int or maxevents <= 0:
        raise fail("EINVAL", f"maxevents {maxevents!r} must be positive", "do_epoll_wait")
    slept = None
    if isinstance(timeout, int) and timeout > 0 and not _would_report(proc, ep):
        # ep_poll() sleeps until an event or the timeout: model time runs its timers meanwhile (a
        # retransmitted SYN that completes a handshake), as a poll() with a timeout does.
        slept = net.sleep_until(lambda: _would_report(proc, ep), timeout / 1000)
    ready: dict[int, int] = {}
    for fd, item in list(ep.items.items()):
        if proc.fds.get(fd) is not item.file:
            del ep.items[fd]  # eventpoll_release(): the file's last close took it out of every interest list
            continue
        if len(ready) >= maxevents:
            break
        woken = _woken(item)
        mask = item.file.sock.ops.poll(item.file.sock) & item.events & ~PRIVATE_BITS
        item.seen = _state(item.file)
        if item.events & EPOLLET and not (item.pending or woken):
            continue  # edge-triggered: nothing new since the last report
        item.pending = False
        if not mask:
            continue
        ready[fd] = mask
        if item.events & EPOLLONESHOT:
            item.events &= PRIVATE_BITS  # disarmed until EPOLL_CTL_MOD
    if not ready and isinstance(timeout, int) and timeout < 0:
        return Result(op, None, None, "nothing ready and no timeout: sleeps", "ep_poll", blocked=True)
    kinds = ", ".join(f"fd {fd}: {mask:#x}" for fd, mask in ready.items()) or "nothing ready"
    if slept is not None:
        kinds += f" after {slept:.1f} s of the {timeout} ms timeout"
    return Result(op, ready, None, kinds, "ep_send_events")


# -- a herd of waiters (the guest agent's epoll_herd): how many one wakeup reaches ----------------------

@dataclass
class Herd:
    """``waiters`` epoll files, each watching one socket with ``events``, each with a thread asleep in it."""

    file: OpenFile
    waiters: int
    events: int
    seen: tuple[int, int, int]
    proc: Any = None


HERD_MAX = 64  # harness/guest/inside/agent.py HERD_MAX
# Armed herds by (process, fd); the process is kept to tell a reused id() from the same process.
_HERDS: dict[tuple[int, int], Herd] = {}


def herd(op: str, proc: "Process", args: Mapping[str, Any]) -> Result:
    fd, waiters = args.get("fd"), args.get("waiters")
    events = int(args.get("events", EPOLLIN) or 0) & 0xFFFFFFFF
    target = proc.fds.get(fd) if type(fd) is int else None
    if not isinstance(target, OpenFile):
        raise fail("EBADF", f"fd {fd!r} is not an open socket", "do_epoll_ctl")
    if events & EPOLLEXCLUSIVE and events & ~EXCLUSIVE_OK:
        raise fail("EINVAL", "EPOLLEXCLUSIVE comes only with IN/OUT/ERR/HUP/WAKEUP/ET", "do_epoll_ctl")
    if type(waiters) is not int or not 1 <= waiters <= HERD_MAX:
        raise fail("EINVAL", f"waiters must be 1 to {HERD_MAX}, not {waiters!r} (the agent's limit)", "epoll_herd")
    timeout = args.get("timeout", 1500)
    if type(timeout) is not int or not 1 <= timeout <= 10_000:
        raise fail("EINVAL", f"timeout must be 1 to 10000 ms, not {timeout!r} (the agent's limit)", "epoll_herd")
    key = (id(proc), fd)
    armed = _HERDS.get(key)
    if armed is not None and armed.proc is proc and armed.file is target:
        raise fail("EBUSY", f"fd {fd} already has a herd", "epoll_herd")
    _HERDS[key] = Herd(target, int(waiters), events | EPOLLERR | EPOLLHUP, _state(target), proc)
    how = "exclusive" if events & EPOLLEXCLUSIVE else "shared"
    return Result(op, 0, None, f"{waiters} epoll files each add fd {fd} ({how} wait queue entries: "
                  "ep_ptable_queue_proc), a thread asleep in each", "ep_ptable_queue_proc")


def herd_wakeups(op: str, proc: "Process", args: Mapping[str, Any]) -> Result:
    fd = args.get("fd")
    armed = _HERDS.pop((id(proc), fd), None) if type(fd) is int else None
    if armed is None or armed.proc is not proc:
        raise fail("ENOENT", f"fd {fd!r} has no herd", "epoll_herd")
    rx, queued, mask = _state(armed.file)
    event = rx > armed.seen[0] or queued > armed.seen[1] or bool(mask & ~armed.seen[2] & armed.events)
    if not event:
        return Result(op, 0, None, "no wakeup since the herd was armed: every waiter times out", "ep_poll")
    if armed.events & EPOLLEXCLUSIVE:
        return Result(op, 1, None, "__wake_up_common() stops at the first exclusive entry whose ep_poll_callback() "
                      "returns 1 (its epoll file has a waiter): one waiter wakes, the others stay asleep",
                      "ep_poll_callback")
    return Result(op, armed.waiters, None, "every entry on the socket's wait queue is non-exclusive: "
                  "__wake_up_common() calls each ep_poll_callback(), which wakes its epoll file's waiter: "
                  f"all {armed.waiters} wake (the thundering herd)", "ep_poll_callback")
