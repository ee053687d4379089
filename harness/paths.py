"""Where socklab keeps things: the image cache, keys and the running labs' state."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SocklabError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LAB = "default"
LAB_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# Written into a home socklab created, so it knows the directory is its own to chmod.
HOME_MARKER = ".socklab-home"
# What a home made by an earlier socklab (before the marker) holds; anything else means "not ours".
# kernels/: user kernels prepared for --kernel-image (harness/image/kernel.py).
_HOME_ENTRIES = {"keys", "run", "logs", "labs", "kernels", "lab.lock", "use.lock", "accel-probe.json", HOME_MARKER}


class PathError(SocklabError):
    """A configured location is unusable (empty, the checkout itself, /, or a directory socklab did not make)."""


def check_location(what: str, value: str | os.PathLike) -> Path:
    """``value`` resolved to an absolute path, refused if it is empty, ``/``, the checkout or one of its parents."""
    text = os.fspath(value)
    if not text.strip():
        raise PathError(f"{what} is empty; unset it or give it a directory, e.g. {REPO_ROOT / '.socklab'}")
    path = Path(text).expanduser().resolve()
    if path == Path(path.anchor):
        raise PathError(f"{what}={text!r} is the root directory; give socklab a directory of its own")
    if path == REPO_ROOT or path in REPO_ROOT.parents:
        raise PathError(f"{what}={text!r} resolves to {path}, which holds this checkout; "
                        f"give socklab a directory of its own, e.g. {REPO_ROOT / '.socklab'}")
    return path


def check_lab_name(name: str) -> str:
    if not isinstance(name, str) or not LAB_NAME.fullmatch(name):
        raise PathError(f"lab name {name!r}: use 1-32 of a-z, 0-9, '-' and '_', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Paths:
    """All on-disk locations, derived from two roots so tests can point them at tmp dirs.

    ``images`` holds recipes (in git) and ``images/cache`` the built entries.
    ``home`` (default ``REPO_ROOT/.socklab``) holds the per-install SSH key, the
    accelerator-probe cache and, per lab name, the lab's state: ``run/`` and
    ``lab.lock`` for the lab named ``default``, ``labs/NAME/`` for the others.
    """

    images: Path
    home: Path

    @classmethod
    def default(cls) -> "Paths":
        home = check_location("SOCKLAB_HOME", os.environ.get("SOCKLAB_HOME", REPO_ROOT / ".socklab"))
        images = check_location("SOCKLAB_IMAGES", os.environ.get("SOCKLAB_IMAGES", REPO_ROOT / "images"))
        return cls(images=images, home=home)

    @property
    def cache(self) -> Path:
        configured = os.environ.get("SOCKLAB_CACHE")
        return check_location("SOCKLAB_CACHE", configured) if configured is not None else self.images / "cache"

    @property
    def keys(self) -> Path:
        return self.home / "keys"

    @property
    def client_key(self) -> Path:
        return self.keys / "id_ed25519"

    @property
    def run(self) -> Path:
        return self.home / "run"

    def lab_dir(self, name: str = DEFAULT_LAB) -> Path:
        """Where lab ``name`` keeps its run dir, lock and logs: the home itself for ``default``."""
        return self.home if check_lab_name(name) == DEFAULT_LAB else self.home / "labs" / name

    def ensure_private(self, path: Path) -> Path:
        """Create ``path`` (and ``home`` above it) as 0700 directories: keys, state and sockets live there.

        Only directories socklab made are ever chmodded: a home that exists
        already must be empty, or hold socklab's own files and nothing else.
        """
        self._claim_home()
        if path != self.home:
            for directory in reversed([path, *path.parents]):
                if directory == self.home or not directory.is_relative_to(self.home):
                    continue
                if not directory.exists():
                    directory.mkdir(mode=0o700)
                directory.chmod(0o700)
        return path

    def _claim_home(self) -> None:
        home = self.home
        if not home.exists():
            home.mkdir(parents=True, mode=0o700)
        elif not home.is_dir():
            raise PathError(f"socklab home {home} is not a directory")
        elif not (home / HOME_MARKER).exists():
            foreign = sorted(entry.name for entry in home.iterdir() if entry.name not in _HOME_ENTRIES)
            if foreign:
                raise PathError(f"socklab home {home} is a directory socklab did not create (it holds "
                                f"{', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}); point SOCKLAB_HOME "
                                "at a new or empty directory")
        if not (home / HOME_MARKER).exists():
            (home / HOME_MARKER).write_text("made by socklab; its keys, lab state and logs live here\n")
        home.chmod(0o700)
