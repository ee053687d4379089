"""Copy versus MSG_ZEROCOPY throughput on the live lab: across the lab segment and over loopback.

A small stdlib-only program is pushed to the guests over SFTP. A sink reads and
discards on the server (198.51.100.2) and on the client's loopback; a sender on
the client pushes one buffer over and over, with plain send() or with
send(MSG_ZEROCOPY) on an SO_ZEROCOPY socket, reading the completions from the
error queue as it goes::

    python -m harness.perf.zerocopy --out results/zerocopy.png     # the running lab (SOCKLAB_HOME)

    from harness.perf.zerocopy import measure, plot
    results = measure(lab, sizes=(4096, 65536), seconds=1.0, repeats=3)
    print(results.table())
    plot(results, Path("results/zerocopy.png"))

Throughput counts bytes the receiver acknowledged: each run waits until the
socket's unacknowledged bytes (SIOCOUTQ) reach zero and, for MSG_ZEROCOPY, until
every completion has arrived, so the cost of completions is in the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SIZES = (4096, 16384, 65536, 262144)
PATHS = ("lab", "loopback")
MODES = ("copy", "zerocopy")
SERVER_ADDRESS = "198.51.100.2"  # the server's lab0 address (harness.scenario.runner.LAB_ADDRESSES)
SINK_PORT = 7990
REMOTE_DIR = "/run/socklab/bench"
REMOTE_PROGRAM = f"{REMOTE_DIR}/zerocopy_guest.py"

# The program that runs inside the guests: standard library only (the guest has Python 3.11,
# whose socket module lacks MSG_ZEROCOPY and SO_ZEROCOPY, so the numbers are spelt out).
GUEST_PROGRAM = r'''
"""socklab zerocopy benchmark, guest side: `sink` reads and discards; `send` measures one path."""
import argparse, errno, fcntl, json, select, socket, struct, sys, threading, time

SO_ZEROCOPY = 60
MSG_ZEROCOPY = 0x4000000
MSG_ERRQUEUE = 0x2000
SO_EE_ORIGIN_ZEROCOPY = 5
SIOCOUTQ = 0x5411                       # TIOCOUTQ: bytes sent but not yet acknowledged
EXTENDED_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err


def sink(args):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.bind, args.port))
    listener.listen(64)

    def drain(conn):
        buffer = bytearray(1 << 20)
        with conn:
            while conn.recv_into(buffer):
                pass

    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


class Completions:
    """Reads MSG_ZEROCOPY notifications: each one covers the send ids lo..hi."""

    def __init__(self, sock):
        self.sock, self.done, self.copied, self.notifications = sock, 0, 0, 0

    def drain(self):
        while True:
            try:
                _, ancdata, _, _ = self.sock.recvmsg(0, 512, MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            for _level, _type, data in ancdata:
                ee_errno, origin, _t, code, _p, lo, hi = EXTENDED_ERR.unpack_from(data)
                if origin != SO_EE_ORIGIN_ZEROCOPY:
                    continue
                count = (hi - lo + 1) & 0xFFFFFFFF
                self.done += count
                self.notifications += 1
                if code == 1:  # SO_EE_CODE_ZEROCOPY_COPIED
                    self.copied += count


def unacked(sock):
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]


def one_run(host, port, size, zerocopy, seconds, warmup):
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if zerocopy:
        sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    flags = MSG_ZEROCOPY if zerocopy else 0
    payload = bytes(size)  # never changed, so reusing it before its completion is harmless
    completions = Completions(sock)
    errors = select.poll()
    errors.register(sock, select.POLLERR)  # readable error queue: a completion is waiting
    sent_calls = enobufs = 0
    sent = 0
    start = time.monotonic()
    timed_from, sent_at_start, unacked_at_start = None, 0, 0
    while True:
        now = time.monotonic()
        if timed_from is None and now - start >= warmup:
            timed_from, sent_at_start, unacked_at_start = now, sent, unacked(sock)
        if timed_from is not None and now - timed_from >= seconds:
            break
        try:
            sent += sock.send(payload, flags)
            sent_calls += 1
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            enobufs += 1  # no option memory for another notification: read what is there, else wait for one
            completions.drain()
            errors.poll(10)
        if zerocopy and sent_calls - completions.done > 32:
            completions.drain()
    deadline = time.monotonic() + 30
    while (unacked(sock) or (zerocopy and completions.done < sent_calls)) and time.monotonic() < deadline:
        if zerocopy:
            errors.poll(5)
            completions.drain()
        else:
            time.sleep(0.001)
    elapsed = time.monotonic() - timed_from
    delivered = sent - sent_at_start + unacked_at_start
    sock.close()
    return {"size": size, "mode": "zerocopy" if zerocopy else "copy", "bytes": delivered, "seconds": elapsed,
            "mbit_s": delivered * 8 / elapsed / 1e6, "sends": sent_calls, "completed": completions.done,
            "copied": completions.copied, "notifications": completions.notifications, "enobufs": enobufs}


def send(args):
    for repeat in range(args.repeats):
        for size in args.sizes:
            for zerocopy in (False, True):  # interleaved, so drift in the host's load hits both alike
                row = one_run(args.host, args.port, size, zerocopy, args.seconds, args.warmup)
                row["repeat"] = repeat
                print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, required=True)
    t = sub.add_parser("send")
    t.add_argument("--host", required=True)
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--sizes", type=int, nargs="+", required=True)
    t.add_argument("--seconds", type=float, required=True)
    t.add_argument("--warmup", type=float, default=0.2)
    t.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    sink(args) if args.command == "sink" else send(args)


main()
'''


@dataclass(frozen=True)
class Sample:
    """One timed run of the guest sender."""

    path: str       # "lab" (client -> server across lab0) or "loopback" (client -> 127.0.0.1)
    mode: str       # "copy" or "zerocopy"
    size: int       # bytes per send()
    repeat: int
    mbit_s: float
    sends: int
    completed: int  # MSG_ZEROCOPY ids the completions covered
    copied: int     # ... of which the kernel reported COPIED (ee_code 1)
    notifications: int
    enobufs: int


@dataclass(frozen=True)
class Row:
    """The repeats of one (path, mode, size), summarised."""

    path: str
    mode: str
    size: int
    mbit_s: tuple[float, ...]
    copied_fraction: float | None  # None for plain copies (they have no completions)

    @property
    def median(self) -> float:
        return statistics.median(self.mbit_s)


@dataclass
class Results:
    """Every sample of a benchmark run, and what the lab looked like while it ran."""

    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0
    repeats: int = 0
    sizes: tuple[int, ...] = ()
    lab_sg: bool | None = None  # ethtool -k lab0 scatter-gather on the client
    kernel: str = ""

    def rows(self) -> list[Row]:
        rows = []
        for path in PATHS:
            for mode in MODES:
                for size in self.sizes:
                    picked = [s for s in self.samples if (s.path, s.mode, s.size) == (path, mode, size)]
                    if not picked:
                        continue
                    completed = sum(s.completed for s in picked)
                    copied = sum(s.copied for s in picked) / completed if mode == "zerocopy" and completed else None
                    rows.append(Row(path, mode, size, tuple(s.mbit_s for s in picked), copied))
        return rows

    def row(self, path: str, mode: str, size: int) -> Row:
        for row in self.rows():
            if (row.path, row.mode, row.size) == (path, mode, size):
                return row
        raise KeyError(f"no samples for {path}/{mode}/{size}")

    def ratio(self, path: str, size: int) -> float:
        """Median zerocopy throughput over median copy throughput for one path and message size."""
        return self.row(path, "zerocopy", size).median / self.row(path, "copy", size).median

    def table(self) -> str:
        lines = [f"{'path':9} {'size':>7} {'copy Mbit/s':>12} {'zerocopy Mbit/s':>16} {'zc/copy':>8} {'COPIED':>7}"]
        for path in PATHS:
            for size in self.sizes:
                try:
                    copy, zc = self.row(path, "copy", size), self.row(path, "zerocopy", size)
                except KeyError:
                    continue
                copied = "-" if zc.copied_fraction is None else f"{zc.copied_fraction:.0%}"
                lines.append(f"{path:9} {size:>7} {copy.median:>12.1f} {zc.median:>16.1f} "
                             f"{zc.median / copy.median:>8.2f} {copied:>7}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "repeats": self.repeats, "sizes": list(self.sizes), "lab_sg": self.lab_sg,
                "kernel": self.kernel, "samples": [s.__dict__ for s in self.samples]}


class _GuestProgram:
    """The guest program on one VM: pushed once, sinks started in the background and killed at the end."""

    def __init__(self, ssh: Any) -> None:
        self.ssh = ssh
        self.sinks: list[int] = []

    def push(self) -> None:
        self.ssh.run(f"mkdir -p {REMOTE_DIR}", check=True)
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
            handle.write(GUEST_PROGRAM)
            local = Path(handle.name)
        try:
            self.ssh.put(local, REMOTE_PROGRAM, mode=0o644)
        finally:
            local.unlink()

    def start_sink(self, bind: str, port: int) -> None:
        log = f"{REMOTE_DIR}/sink-{port}.log"
        # setsid + redirected descriptors: the SSH channel closes while the sink runs on.
        result = self.ssh.run(f"setsid python3 {REMOTE_PROGRAM} sink --bind {bind} --port {port} "
                              f">{log} 2>&1 </dev/null & echo $!", check=True)
        self.sinks.append(int(result.stdout.split()[-1]))
        deadline = time.monotonic() + 30
        while "ready" not in self.ssh.run(f"cat {log}").stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.ssh.vm}: the benchmark sink on port {port} did not start: "
                                   f"{self.ssh.run(f'cat {log}').stdout.strip()}")
            time.sleep(0.2)

    def stop(self) -> None:
        for pid in self.sinks:
            self.ssh.run(f"kill {pid} 2>/dev/null")
        self.sinks.clear()


def _send(ssh: Any, host: str, sizes: Iterable[int], seconds: float, repeats: int, path: str) -> list[Sample]:
    sizes = list(sizes)
    budget = (seconds + 2.0) * len(sizes) * len(MODES) * repeats + 60
    result = ssh.run(f"python3 {REMOTE_PROGRAM} send --host {host} --port {SINK_PORT} "
                     f"--sizes {' '.join(map(str, sizes))} --seconds {seconds} --repeats {repeats}",
                     timeout=budget, check=True)
    samples = []
    for line in result.stdout.splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        samples.append(Sample(path, row["mode"], row["size"], row["repeat"], row["mbit_s"], row["sends"],
                              row["completed"], row["copied"], row["notifications"], row["enobufs"]))
    return samples


def measure(lab: Any, sizes: Iterable[int] = DEFAULT_SIZES, seconds: float = 2.0, repeats: int = 3) -> Results:
    """Copy and MSG_ZEROCOPY throughput, client -> server across the lab segment and over the client's loopback."""
    sizes = tuple(sizes)
    client, server = lab.ssh("client"), lab.ssh("server")
    on_client, on_server = _GuestProgram(client), _GuestProgram(server)
    results = Results(seconds=seconds, repeats=repeats, sizes=sizes)
    results.kernel = client.run("uname -r").stdout.strip()
    features = client.run("ethtool -k lab0").stdout
    results.lab_sg = "scatter-gather: on" in features
    try:
        on_client.push()
        on_server.push()
        on_server.start_sink("0.0.0.0", SINK_PORT)
        on_client.start_sink("127.0.0.1", SINK_PORT)
        results.samples += _send(client, SERVER_ADDRESS, sizes, seconds, repeats, "lab")
        results.samples += _send(client, "127.0.0.1", sizes, seconds, repeats, "loopback")
    finally:
        on_client.stop()
        on_server.stop()
    return results


def plot(results: Results, path: Path) -> Path:
    """A PNG of throughput against message size: copy and MSG_ZEROCOPY, lab segment and loopback."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=False)
    titles = {"lab": f"lab segment (virtio-net, scatter-gather {'on' if results.lab_sg else 'off'})",
              "loopback": "loopback (the kernel copies: COPIED)"}
    styles = {"copy": dict(color="tab:blue", marker="o"), "zerocopy": dict(color="tab:orange", marker="s")}
    for axis, where in zip(axes, PATHS):
        for mode in MODES:
            rows = [r for r in results.rows() if r.path == where and r.mode == mode]
            if not rows:
                continue
            xs = [r.size for r in rows]
            medians = [r.median for r in rows]
            low = [r.median - min(r.mbit_s) for r in rows]
            high = [max(r.mbit_s) - r.median for r in rows]
            label = "send()" if mode == "copy" else "send(MSG_ZEROCOPY)"
            axis.errorbar(xs, medians, yerr=[low, high], capsize=3, label=label, **styles[mode])
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(results.sizes))
        axis.set_xticklabels([f"{size // 1024} KiB" for size in results.sizes])
        axis.set_xlabel("bytes per send()")
        axis.set_ylabel("throughput, Mbit/s (median, min-max)")
        axis.set_ylim(bottom=0)
        axis.set_title(titles[where], fontsize=10)
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.suptitle(f"TCP copy vs MSG_ZEROCOPY, {results.kernel or 'guest kernel'} under QEMU "
                 f"({results.repeats} x {results.seconds:g} s per point)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.perf.zerocopy", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/zerocopy.png"), help="PNG to write")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="bytes per send()")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per point")
    parser.add_argument("--repeats", type=int, default=3, help="runs per point")
    args = parser.parse_args(argv)

    from harness.errors import SocklabError
    from harness.lab.lifecycle import Lab
    from harness.paths import DEFAULT_LAB, Paths, check_lab_name

    try:
        lab = Lab(Paths.default(), check_lab_name(os.environ.get("SOCKLAB_LAB") or DEFAULT_LAB))
        state = lab.load()
        if state is None or not all(lab.alive(state).values()):
            raise SocklabError("no lab is running: `invoke lab.up` first (SOCKLAB_HOME and SOCKLAB_LAB pick which lab)")
        results = measure(lab, args.sizes, args.seconds, args.repeats)
    except SocklabError as exc:
        print(f"socklab: {exc}", file=sys.stderr)
        return 2
    finally:
        lab.close()
    print(results.table())
    for where in PATHS:
        ratios = ", ".join(f"{size}: {results.ratio(where, size):.2f}" for size in results.sizes)
        print(f"zerocopy/copy on {where}: {ratios}")
    plot(results, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(results.to_json(), indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
