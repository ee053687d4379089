"""Where socklab keeps things and finds things: recipes, labs, the image cache, keys, the labs' state.

Each location is found the same way, first match wins (this is the one place that says so):

1. a command-line option, where the task has one (``--out`` for results, a lab given by path);
2. the environment: ``SOCKLAB_IMAGES`` (image recipes: ``<name>.yaml``, ``rootfs/``, ``initrd/``),
   ``SOCKLAB_LABS`` (the course labs), ``SOCKLAB_CACHE`` (built images), ``SOCKLAB_HOME`` (keys
   and lab state), ``SOCKLAB_RESULTS`` (reports, harness/results.py);
3. invoke config (invoke.yaml): ``images.dir``, ``lab.labs_dir``, ``results.dir``; the tasks hand
   the first two to ``configure`` before they run;
4. the default. In a source checkout (``IN_CHECKOUT``) that is the checkout: ``labs/``,
   ``images/cache/``, ``.socklab/``, ``results/``. Installed from a wheel, it is the current
   directory's ``labs/`` and ``results/``, ``$XDG_CACHE_HOME/socklab/images`` and
   ``$XDG_STATE_HOME/socklab``. The recipes default to the ones shipped inside the package
   (``harness/image/recipes``) either way, so an install builds the same images a checkout does.

A recipe directory given by ``SOCKLAB_IMAGES`` or ``images.dir`` keeps its cache beside it
(``<dir>/cache``) unless ``SOCKLAB_CACHE`` says otherwise, as before.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SocklabError

REPO_ROOT = Path(__file__).resolve().parent.parent
# A source checkout (tasks.py and pyproject.toml beside the package), not an installed wheel.
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "tasks.py").is_file()
# The image recipes shipped with the package.
PACKAGE_RECIPES = Path(__file__).resolve().parent / "image" / "recipes"
# What invoke config says (configure); the environment still wins over it.
_configured: dict[str, str | None] = {"images": None, "labs": None}
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


def configure(images: str | None = None, labs: str | None = None) -> None:
    """The invoke config's ``images.dir`` and ``lab.labs_dir`` (None: not set); tasks.py calls it per task."""
    _configured.update(images=images or None, labs=labs or None)


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable, "")
    return Path(value) if os.path.isabs(value) else Path.home() / fallback


def project_root() -> Path:
    """Where a checkout keeps labs/, results/ and work/: the checkout, or for an install the current directory."""
    return REPO_ROOT if IN_CHECKOUT else Path.cwd()


def labs_dir() -> Path:
    """Where the course labs are: SOCKLAB_LABS, else invoke's lab.labs_dir, else ``labs/`` (module docstring)."""
    for what, value in (("SOCKLAB_LABS", os.environ.get("SOCKLAB_LABS")), ("lab.labs_dir", _configured["labs"])):
        if value is not None:
            if not value.strip():
                raise PathError(f"{what} is empty; unset it or give it the directory that holds the labs")
            return Path(value).expanduser().resolve()
    return project_root() / "labs"


def check_lab_name(name: str) -> str:
    if not isinstance(name, str) or not LAB_NAME.fullmatch(name):
        raise PathError(f"lab name {name!r}: use 1-32 of a-z, 0-9, '-' and '_', starting with a letter or digit")
    return name


def default_cache() -> Path:
    """Where built images go when nothing says: ``images/cache`` of a checkout, the XDG cache otherwise."""
    return REPO_ROOT / "images" / "cache" if IN_CHECKOUT else _xdg("XDG_CACHE_HOME", ".cache") / "socklab" / "images"


@dataclass(frozen=True)
class Paths:
    """All on-disk locations, derived from two roots so tests can point them at tmp dirs.

    ``images`` holds the recipes and ``cache_dir`` the built entries (``images/cache``
    when not given). ``home`` holds the per-install SSH key, the accelerator-probe
    cache and, per lab name, the lab's state: ``run/`` and ``lab.lock`` for the lab
    named ``default``, ``labs/NAME/`` for the others. ``default`` finds them as the
    module docstring says.
    """

    images: Path
    home: Path
    cache_dir: Path | None = None

    @classmethod
    def default(cls) -> "Paths":
        home_default = REPO_ROOT / ".socklab" if IN_CHECKOUT else _xdg("XDG_STATE_HOME", ".local/state") / "socklab"
        home = check_location("SOCKLAB_HOME", os.environ.get("SOCKLAB_HOME", home_default))
        given = os.environ.get("SOCKLAB_IMAGES", _configured["images"])
        if given is not None:
            what = "SOCKLAB_IMAGES" if "SOCKLAB_IMAGES" in os.environ else "images.dir"
            return cls(images=check_location(what, given), home=home)
        return cls(images=PACKAGE_RECIPES, home=home, cache_dir=default_cache())

    @property
    def cache(self) -> Path:
        configured = os.environ.get("SOCKLAB_CACHE")
        if configured is not None:
            return check_location("SOCKLAB_CACHE", configured)
        if self.cache_dir is not None:
            return self.cache_dir
        # The shipped recipes, however they were named (SOCKLAB_IMAGES, or a Paths built from another's
        # .images): the package's own directory is never a cache.
        if self.images.resolve() == PACKAGE_RECIPES.resolve():
            return default_cache()
        return self.images / "cache"

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
