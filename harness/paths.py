"""Where socklab keeps things: the image cache, keys and the running lab's state."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Paths:
    """All on-disk locations, derived from two roots so tests can point them at tmp dirs.

    ``images`` holds recipes (in git) and ``images/cache`` the built entries.
    ``home`` (default ``REPO_ROOT/.socklab``) holds the per-install SSH key, the
    accelerator-probe cache and ``run/``, the running lab's state.
    """

    images: Path
    home: Path

    @classmethod
    def default(cls) -> "Paths":
        home = Path(os.environ.get("SOCKLAB_HOME", REPO_ROOT / ".socklab"))
        images = Path(os.environ.get("SOCKLAB_IMAGES", REPO_ROOT / "images"))
        return cls(images=images, home=home)

    @property
    def cache(self) -> Path:
        return Path(os.environ.get("SOCKLAB_CACHE", self.images / "cache"))

    @property
    def keys(self) -> Path:
        return self.home / "keys"

    @property
    def client_key(self) -> Path:
        return self.keys / "id_ed25519"

    @property
    def run(self) -> Path:
        return self.home / "run"

    def ensure_private(self, path: Path) -> Path:
        """Create ``path`` (and ``home`` above it) as 0700 directories: keys, state and sockets live there."""
        for directory in ([self.home] if path != self.home and path.is_relative_to(self.home) else []) + [path]:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            directory.chmod(0o700)
        return path
