"""Where reports go: a new directory per run under one results root, never shared by two runs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .errors import SocklabError
from .paths import project_root

# results/ of the checkout (installed: of the current directory); harness/paths.py says why.
DEFAULT_ROOT = project_root() / "results"


def results_root(option: str | None = None, configured: str | None = None) -> Path:
    """The results root: ``--out DIR``, else ``SOCKLAB_RESULTS``, else ``results.dir`` in invoke.yaml, else ``results/``."""
    chosen = next((value for value in (option, os.environ.get("SOCKLAB_RESULTS"), configured) if value is not None), None)
    if chosen is not None and not str(chosen).strip():
        raise SocklabError("the results directory is empty: give --out DIR (or SOCKLAB_RESULTS) a path")
    return Path(chosen).expanduser() if chosen else DEFAULT_ROOT


def new_run_dir(root: Path, name: str, clock=time.localtime) -> Path:
    """Make ``root/<name>-<date>-<time>`` (``-2``, ``-3``, … when that exists): two runs never share one."""
    stamp = time.strftime("%Y%m%d-%H%M%S", clock())
    try:
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 1000):
            directory = root / (f"{name}-{stamp}" if attempt == 1 else f"{name}-{stamp}-{attempt}")
            try:
                directory.mkdir()  # atomic: of two runs racing for one name, one gets the next
                return directory
            except FileExistsError:
                continue
    except OSError as exc:
        raise SocklabError(f"cannot write reports to {root}: {exc.strerror or exc}; "
                           "choose another place with --out DIR or SOCKLAB_RESULTS") from None
    raise SocklabError(f"cannot write reports to {root}: 999 runs named {name!r} in one second")
