"""Every bound on a wait, in one place, and a small deadline object to carry one through a loop.

A guest that is paused (QMP ``stop``), a QEMU stopped with SIGSTOP, or a
wedged monitor answers nothing, ever: any wait without a bound then hangs
socklab. Libraries have generous defaults of their own (paramiko's
``open_session`` waits 3,600 s), so every call that waits on a guest or on
QEMU passes one of these.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# SSH: a channel open (a command, the agent, the stats shell) is one round trip to sshd.
SSH_CHANNEL_OPEN = 5.0
# SSH: the exit status that trails a killed remote command.
SSH_EXIT_STATUS = 5.0
# QMP: connecting to a monitor and one command's answer.
QMP_CONNECT = 5.0
QMP_CALL = 5.0
# QMP: a quick look at a VM's run state while something else waits on it.
QMP_PROBE = 1.0
# While waiting on a guest (an agent's reply, a command), how often to look whether its VM still runs.
WATCH_INTERVAL = 2.0
# SSH: one command's default run time, and reaching a guest's sshd.
SSH_COMMAND = 30.0
SSH_CONNECT = 30.0
# The guest agent: one step's reply (stretched by what the step waits for), and its start-up
# (python3 under TCG takes about a second; room for a busy host).
AGENT_REPLY = 10.0
AGENT_START = 30.0
# A stats snapshot of one guest (ss, ethtool, /proc/net in one round trip).
STATS_COLLECT = 20.0
# The serial console: one expected prompt or marker.
CONSOLE_READ = 30.0
# QEMU: until -daemonize returns (devices set up), and until a quit guest's process is gone.
QEMU_START = 60.0
QEMU_STOP = 5.0
# Saving one VM's RAM and device state to a file; a restored guest reaching SSH.
SNAPSHOT_SAVE = 60.0
SNAPSHOT_RESTORE = 20.0


@dataclass
class Deadline:
    """A moment ``seconds`` from now on a monotonic clock (injectable for tests)."""

    seconds: float
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.at = self.clock() + self.seconds

    def remaining(self, at_most: float | None = None) -> float:
        """Seconds left (never below 0), capped by ``at_most``."""
        left = max(0.0, self.at - self.clock())
        return left if at_most is None else min(left, at_most)

    @property
    def expired(self) -> bool:
        return self.clock() >= self.at
