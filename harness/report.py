"""Tables for the terminal: the lab's status."""

from __future__ import annotations

import time

from rich.table import Table

from .errors import SocklabError


def offloads(lab, name: str) -> tuple[str, str]:
    """(scatter-gather, tx-checksumming) of the guest's lab NIC, from its own ethtool -k."""
    try:
        result = lab.ssh(name, timeout=5).run("ethtool -k lab0", timeout=10)
    except SocklabError:
        return "?", "?"
    features = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(":")
        features[key.strip()] = value.strip()
    return features.get("scatter-gather", "?"), features.get("tx-checksumming", "?")


def status_table(lab, state, live: bool = True) -> Table:
    alive = lab.alive(state)
    table = Table(title=f"socklab lab {state.lab_id} ({state.topology})", title_justify="left")
    for column in ("VM", "pid", "state", "SSH", "lab0", "up", "sg", "tx-csum"):
        table.add_column(column, no_wrap=True)
    uptime = f"{time.time() - state.started_at:.0f} s" if state.started_at else "-"
    for vm in state.vms:
        running = alive.get(vm.name, False)
        sg, csum = offloads(lab, vm.name) if (live and running) else ("-", "-")
        table.add_row(vm.name, str(vm.pid or "-"), "running" if running else "[red]dead[/]",
                      f":{vm.ssh_port}", vm.address, uptime, sg, csum)
    table.caption = (f"accelerator {state.accel}: {state.accel_reason}\n"
                     f"segment {state.segment}: {state.segment_reason}"
                     + (f"\nnetns {state.netns}" if state.netns else ""))
    table.caption_justify = "left"
    return table
