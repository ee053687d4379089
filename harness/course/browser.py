"""Open an HTML page in headless Chromium and report what a reader would see go wrong.

Used by the tests of the HTML reports: a page must render, every image must
load, and the console must stay quiet. Chromium runs with a fresh profile in
a temporary directory, no sandbox (it runs as root in the test machine), no
GPU and none of its background network traffic; the page is a local file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import HostToolMissing

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")
_CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]? ?(.*)$")


@dataclass(frozen=True)
class PageCheck:
    images_loaded: int
    images: int
    console: tuple[str, ...]
    dom: str

    @property
    def ok(self) -> bool:
        return self.images_loaded == self.images and not self.console and "<body" in self.dom


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def check_page(page: Path, screenshot: Path | None = None, size: str = "1400,2400", timeout: float = 90) -> PageCheck:
    """Load ``page`` (a file) and return its images' load count, console messages and the DOM after load."""
    binary = chromium()
    if binary is None:
        raise HostToolMissing("chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="socklab-chromium-") as profile:
        common = [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}", "--virtual-time-budget=3000"]
        run = subprocess.run([*common, "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()],
                             capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if screenshot is not None:
            subprocess.run([*common, f"--screenshot={screenshot}", page.resolve().as_uri()], capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    console = tuple(m.group(1) for line in run.stderr.splitlines() if (m := _CONSOLE.search(line)))
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', run.stdout)
    images = len(re.findall(r"<img\b", run.stdout))
    return PageCheck(int(loaded.group(1)) if loaded else 0, images if not loaded else int(loaded.group(2)),
                     console, run.stdout)
