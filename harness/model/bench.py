"""Throughput benchmark: modelled syscalls per second on a realistic mixed workload."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from .constants import AF_INET, MSG_DONTWAIT, POLLIN, SOCK_DGRAM, SOCK_STREAM, SOL_SOCKET, SO_RCVBUF, SO_SNDBUF
from .network import Network

CALLS_PER_ROUND = 16


def _setup() -> tuple[Network, Any, Any, int, int]:
    net = Network()
    server = net.add_host("server", addrs=["198.51.100.1"])
    client = net.add_host("client", addrs=["198.51.100.2"])
    lfd = server.call("socket", {"family": AF_INET, "type": SOCK_STREAM}).ret
    server.call("bind", {"fd": lfd, "addr": ("0.0.0.0", 7000)})
    server.call("listen", {"fd": lfd, "backlog": 128})
    ufd = server.call("socket", {"family": AF_INET, "type": SOCK_DGRAM}).ret
    server.call("bind", {"fd": ufd, "addr": ("0.0.0.0", 5000)})
    return net, server, client, lfd, ufd


def _round(server: Any, client: Any, lfd: int, ufd: int) -> None:
    """One TCP connection lifetime plus a datagram and a few option/poll calls: CALLS_PER_ROUND syscalls."""
    s, c = server.call, client.call
    fd = c("socket", {"family": AF_INET, "type": SOCK_STREAM}).ret
    c("setsockopt", {"fd": fd, "level": SOL_SOCKET, "optname": SO_SNDBUF, "value": 65536})
    c("connect", {"fd": fd, "addr": ("198.51.100.1", 7000)})
    s("poll", {"fds": [lfd], "events": POLLIN})
    child = s("accept", {"fd": lfd}).ret
    c("send", {"fd": fd, "data": b"x" * 512})
    s("recv", {"fd": child, "length": 4096})
    s("send", {"fd": child, "data": b"y" * 128})
    c("recv", {"fd": fd, "length": 4096, "flags": MSG_DONTWAIT})
    s("getsockopt", {"fd": child, "level": SOL_SOCKET, "optname": SO_RCVBUF})
    c("getsockname", {"fd": fd})
    c("bind", {"fd": fd, "addr": ("0.0.0.0", 7000)})  # EINVAL: already bound
    u = c("socket", {"family": AF_INET, "type": SOCK_DGRAM}).ret
    c("sendto", {"fd": u, "data": b"d", "addr": ("198.51.100.1", 5000)})
    s("recvfrom", {"fd": ufd, "length": 64})
    c("close", {"fd": u})
    # the client closes first, so TIME_WAIT lands on its ephemeral port
    c("close", {"fd": fd})
    s("close", {"fd": child})


def measure(n_calls: int = 200_000, repeats: int = 5) -> dict[str, Any]:
    """Run the mixed workload ``repeats`` times with about ``n_calls`` syscalls each; report calls/s.

    ``median``/``min``/``max`` use the process's CPU time, so other programs competing for the
    machine's two cores (lab VMs, say) do not distort the model's own cost; ``wall_*`` give the
    same figures against the wall clock.
    """
    rounds = max(1, n_calls // (CALLS_PER_ROUND + 2))
    calls = rounds * (CALLS_PER_ROUND + 2)
    cpu_rates, wall_rates = [], []
    for _ in range(repeats):
        net, server, client, lfd, ufd = _setup()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(rounds):
            _round(server, client, lfd, ufd)
            if i % 2000 == 1999:
                net.advance(61)  # let TIME_WAIT minisocks expire, as wall-clock time would
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        cpu_rates.append(calls / cpu)
        wall_rates.append(calls / wall)
    return {
        "calls_per_repeat": calls,
        "repeats": repeats,
        "median": statistics.median(cpu_rates),
        "min": min(cpu_rates),
        "max": max(cpu_rates),
        "wall_median": statistics.median(wall_rates),
        "wall_min": min(wall_rates),
        "wall_max": max(wall_rates),
        "unit": "modelled syscalls per second (CPU time of this process)",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    figures = measure(args.calls, args.repeats)
    print(f"model throughput over {figures['repeats']} x {figures['calls_per_repeat']} calls: "
          f"median {figures['median']:,.0f}/s (min {figures['min']:,.0f}, max {figures['max']:,.0f}) CPU time; "
          f"wall clock median {figures['wall_median']:,.0f}/s (min {figures['wall_min']:,.0f}, "
          f"max {figures['wall_max']:,.0f})")


if __name__ == "__main__":
    main()
