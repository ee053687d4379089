"""Differential throughput: batched live steps per second on one VM, fuzz programs per second on the model."""

from __future__ import annotations

import itertools
import time
from typing import Any

from harness.guest.client import Agent
from .engine import fuzz, run_program
from .generate import generate
from .live import LiveKernel

BATCH_STEPS = 2000


def _program_steps(fd_ref: dict[str, Any]) -> list[dict[str, Any]]:
    """A mixed batch: socket, options, a failing bind, poll, recv EAGAIN, close, over and over."""
    steps: list[dict[str, Any]] = []
    while len(steps) < BATCH_STEPS:
        steps += [
            {"op": "socket", "args": {"family": 2, "type": 2 | 0o4000}, "save": "u"},
            {"op": "setsockopt", "args": {"fd": fd_ref, "level": 1, "optname": 2, "value": 1}},
            {"op": "getsockopt", "args": {"fd": fd_ref, "level": 1, "optname": 8}},
            {"op": "bind", "args": {"fd": fd_ref, "addr": ["198.51.100.77", 9]}},
            {"op": "poll", "args": {"fds": [fd_ref], "events": 1, "timeout": 0}},
            {"op": "recv", "args": {"fd": fd_ref, "length": 16, "flags": 0x40}},
            {"op": "fcntl", "args": {"fd": fd_ref, "cmd": 3}},
            {"op": "close", "args": {"fd": fd_ref}},
        ]
    return steps[:BATCH_STEPS]


def live_batched(lab: Any, vm: str = "server") -> tuple[float, float]:
    """(steps/s of one batch of BATCH_STEPS, steps/s of the same steps one round trip each, first 200)."""
    with Agent(lab.ssh(vm), vm) as agent:
        steps = _program_steps({"$ref": "u", "fd": True})
        agent.batch(steps[:50])  # warm: the agent's code paths, the SSH window
        started = time.perf_counter()
        agent.batch(steps)
        batched = len(steps) / (time.perf_counter() - started)
        agent.reset()
        single = 200
        started = time.perf_counter()
        for step in steps[:single]:
            agent.batch([step])
        one_by_one = single / (time.perf_counter() - started)
        agent.reset()
    return batched, one_by_one


_SEEDS = itertools.count(99)


def fuzz_live(lab: Any, steps: int = 3000, seed: int | None = None) -> float:
    """Steps per second the fuzzer's own segments run at on the lab (both VMs, all users).

    Each call takes a new seed unless given one: a seed run again within a minute meets its own
    TIME_WAIT sockets and disagrees with the model (then waits out the settle time) on purpose.
    The agents' start-up (once per run, in parallel) is not a segment's time.
    """
    kernel = LiveKernel(lab)
    try:
        fuzz(steps, next(_SEEDS) if seed is None else seed, kernel, do_shrink=False)
    finally:
        kernel.close()
    return kernel.steps / kernel.segment_seconds


def model_programs(steps: int = 20_000, seed: int = 99) -> float:
    """Fuzz program steps per second on the model alone (generation excluded; validation included)."""
    programs = []
    total = 0
    number = 0
    while total < steps:
        program = generate(seed, number)
        programs.append(program)
        total += len(program.steps)
        number += 1
    started = time.perf_counter()
    for program in programs:
        run_program(program, None)
    return total / (time.perf_counter() - started)
