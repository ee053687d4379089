"""Build and cache the Debian guest image: ext4 root, kernel, initrd, pinned host key.

A cache entry is ``images/cache/<recipe>-<hash>/``, where the hash covers
everything that decides the image's contents (the recipe, the files laid into
the root, the initrd's init, the authorised client key and this builder's
layout version). An entry is built in a temporary directory beside it and
renamed into place only when complete, so an interrupted build leaves nothing
that could be mistaken for an image. A forced rebuild swaps the new entry in
only once it is whole: a build that fails (an unreachable mirror, a full
disk) leaves the old entry and its snapshots as they were.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness import progress
from harness.host import deps as hostdeps
from harness import load as textio
from harness.errors import ImageError
from harness.image import pvh
from harness.image.initrd import build_initrd
from harness.paths import Paths

# Bump when the layout of a cache entry or the build steps change.
BUILDER_VERSION = 2
ROOTFS = "rootfs.ext4"
KERNEL = "vmlinuz"
# The same kernel's ELF, booted at its PVH entry (harness/image/pvh.py); absent if the kernel has none.
PVH_KERNEL = "vmlinux"
INITRD = "initrd.img"
HOST_KEY = "ssh_host_ed25519_key.pub"
MANIFEST = "manifest.json"
STAMPS = "verified.json"


@dataclass(frozen=True)
class Recipe:
    """What goes into a guest image (``images/<name>.yaml``)."""

    name: str
    suite: str
    kernel: str
    variant: str
    packages: tuple[str, ...]
    dpkg_excludes: tuple[str, ...]
    apt_options: tuple[str, ...]
    initrd_modules: tuple[str, ...]
    free_space_mib: int

    @classmethod
    def load(cls, images_dir: Path, name: str) -> "Recipe":
        """``images_dir/<name>.yaml``, checked: a name is a plain file name in images/, every field its type."""
        known = sorted(p.stem for p in images_dir.glob("*.yaml"))
        if not isinstance(name, str) or not _RECIPE_NAME.match(name) or not os.path.exists(images_dir / f"{name}.yaml"):
            shown = name if not isinstance(name, str) or len(name) <= 80 else name[:80] + "…"
            raise ImageError(f"unknown image recipe {shown!r}; known: {', '.join(known) or 'none'}")
        path = images_dir / f"{name}.yaml"
        where = str(path)
        data = textio.parse_yaml(textio.read_text(path, "image recipe", error=ImageError), where, error=ImageError)
        if not isinstance(data, textio.YamlMap):  # parse_yaml's mappings know their lines
            raise ImageError(f"{where}:1: a recipe is a mapping (suite, packages, initrd_modules, ...)")
        textio.check_keys(data, RECIPE_FIELDS, where, error=ImageError)
        for key in ("suite", "kernel", "packages", "initrd_modules"):
            if key not in data:
                raise ImageError(f"{where}:1: the recipe needs `{key}:`")
        for key, (kind, pattern) in RECIPE_FIELDS.items():
            if key not in data:
                continue
            value = textio.expect_type(data[key], kind, where, data.line_of(key), key, error=ImageError)
            for index, item in enumerate(value if kind is list else [value]):
                line = value.line_of(index) if kind is list else data.line_of(key)
                if kind is list:
                    textio.expect_type(item, str, where, line, key, error=ImageError)
                if pattern is not None and not pattern.match(str(item)):
                    raise ImageError(f"{where}:{line}: `{key}:` has {item!r}, which is not a valid name")
        free = data.get("free_space_mib", 256)
        if not 0 <= free <= 1 << 16:
            raise ImageError(f"{where}:{data.line_of('free_space_mib')}: `free_space_mib:` takes 0 to 65536, not {free}")
        return cls(
            name=name,
            suite=data["suite"],
            kernel=data["kernel"],
            variant=data.get("variant", "minbase"),
            packages=tuple(data["packages"]),
            dpkg_excludes=tuple(data.get("dpkg_excludes", ())),
            apt_options=tuple(data.get("apt_options", ())),
            initrd_modules=tuple(data["initrd_modules"]),
            free_space_mib=free,
        )


# A recipe is a file name in images/, never a path: "../x" must not read a file elsewhere.
_RECIPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_WORD = re.compile(r"^[a-z0-9][a-z0-9+._-]*$")  # Debian package, suite and variant names
# field -> (type, pattern each value must match)
RECIPE_FIELDS: dict[str, tuple[type, re.Pattern | None]] = {
    "suite": (str, _WORD), "kernel": (str, re.compile(r"^[0-9]+(\.[0-9]+)*$")), "variant": (str, _WORD),
    "packages": (list, _WORD), "apt_options": (list, re.compile(r"^[^\n]+$")),
    "dpkg_excludes": (list, re.compile(r"^/[^,\s]*$")), "initrd_modules": (list, re.compile(r"^[A-Za-z0-9_-]+$")),
    "free_space_mib": (int, None),
}


def recipes(images_dir: Path) -> list[Recipe]:
    """Every recipe in ``images_dir``, by name."""
    return [Recipe.load(images_dir, path.stem) for path in sorted(images_dir.glob("*.yaml"))]


def resolve(images_dir: Path, name_or_kernel: str) -> Recipe:
    """The recipe named ``name_or_kernel`` (``trixie``), or the one whose kernel series it is (``6.12``)."""
    if _RECIPE_NAME.match(str(name_or_kernel)) and os.path.isfile(images_dir / f"{name_or_kernel}.yaml"):
        return Recipe.load(images_dir, name_or_kernel)
    known = recipes(images_dir)
    for recipe in known:
        if recipe.kernel == str(name_or_kernel):
            return recipe
    choices = ", ".join(f"{r.kernel} ({r.name})" for r in known) or "none"
    shown = str(name_or_kernel) if len(str(name_or_kernel)) <= 80 else str(name_or_kernel)[:80] + "…"
    raise ImageError(f"unknown kernel or image recipe {shown!r}; known: {choices}")


def release_in_series(release: str, series: str) -> bool:
    """``6.12.57+deb13-cloud-amd64`` is of series ``6.12``; ``6.1.0-57-cloud-amd64`` is of ``6.1``, not ``6.12``."""
    return release == series or release.startswith((f"{series}.", f"{series}-", f"{series}+"))


@dataclass(frozen=True)
class Image:
    """A complete cache entry. Paths are absolute; ``sha256`` maps file name to digest."""

    directory: Path
    recipe_hash: str
    kernel_release: str
    host_key: str
    sha256: dict
    recipe: str = ""
    suite: str = ""
    kernel_series: str = ""
    # Debian package -> version, as resolved when the image was built (forky moves).
    packages: dict = field(default_factory=dict)

    @property
    def kernel_package(self) -> str:
        """The version of the kernel's Debian package, e.g. ``6.12.57-1``, or "" if not recorded."""
        return self.packages.get(f"linux-image-{self.kernel_release}", "")

    @property
    def rootfs(self) -> Path:
        return self.directory / ROOTFS

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD

    @property
    def boot_kernel(self) -> Path:
        """What QEMU's -kernel gets: the ELF with its PVH entry if the build made one, else the bzImage."""
        return self.directory / PVH_KERNEL if PVH_KERNEL in self.sha256 else self.kernel

    @classmethod
    def load(cls, directory: Path) -> "Image":
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            return cls(
                directory=directory,
                recipe_hash=manifest["recipe_hash"],
                kernel_release=manifest["kernel_release"],
                host_key=manifest["host_key"],
                sha256=manifest["sha256"],
                recipe=manifest.get("recipe", ""),
                suite=manifest.get("suite", ""),
                kernel_series=manifest.get("kernel_series", ""),
                packages=manifest.get("packages", {}),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:  # TypeError: a manifest that is [] or null
            raise ImageError(f"{directory}: unreadable image manifest ({exc}); rebuild with `invoke images.build`") from exc

    def damaged(self, full: bool = False) -> list[str]:
        """Files whose content no longer matches the digest recorded when they were built.

        Hashing the 600 MB root costs most of a second, so unless ``full`` is set a
        file whose size, mtime and inode are those recorded after its last full
        check is taken as unchanged: any write to it (truncate, dd, an editor)
        moves its mtime, and then it is hashed again.
        """
        stamps_file = self.directory / STAMPS
        try:
            stamps = json.loads(stamps_file.read_text())
        except (OSError, ValueError):
            stamps = {}
        bad, checked = [], {}
        for name, digest in self.sha256.items():
            path = self.directory / name
            try:
                info = path.stat()
            except OSError:
                bad.append(name)
                continue
            stamp = file_stamp(info)
            if not full and stamps.get(name) == stamp:
                checked[name] = stamp
            elif file_sha256(path) == digest:
                checked[name] = stamp
            else:
                bad.append(name)
        if not bad and checked != stamps:
            try:
                stamps_file.write_text(json.dumps(checked))
            except OSError:
                pass  # a read-only cache still works; it just hashes every time
        return bad


def file_stamp(info: os.stat_result) -> list[int]:
    """What a write to a file changes (size, mtime, inode): a file whose stamp is the one recorded
    after its last full hash is taken as unchanged, and is not hashed again."""
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def recipe_hash(paths: Paths, recipe: Recipe, client_pubkey: str) -> str:
    """Hash of every input that decides the image's bytes; the cache key."""
    digest = hashlib.sha256(f"socklab-image v{BUILDER_VERSION}\n".encode())
    digest.update((paths.images / f"{recipe.name}.yaml").read_bytes())
    for tree in (paths.images / "rootfs", paths.images / "initrd"):
        for path in _tree_files(tree):
            digest.update(str(path.relative_to(paths.images)).encode() + b"\0")
            digest.update(oct(path.lstat().st_mode & 0o7777).encode())
            digest.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    digest.update(client_pubkey.strip().encode())
    return digest.hexdigest()[:16]


def ensure_client_key(paths: Paths) -> str:
    """The per-install SSH key (0600) the image authorises for root; made once. Returns the public key."""
    key = paths.client_key
    if not key.exists():
        paths.ensure_private(paths.keys)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "socklab-client", "-f", str(key)], "ssh-keygen")
    key.chmod(0o600)
    return key.with_suffix(".pub").read_text().strip()


def entry_dir(paths: Paths, recipe: Recipe, key: str) -> Path:
    return paths.cache / f"{recipe.name}-{key}"


def find(paths: Paths, recipe_name: str = "bookworm") -> Image:
    """The built image for a recipe (or kernel series), or an error saying how to build it (or how to get at it)."""
    recipe = resolve(paths.images, recipe_name)
    try:
        if not paths.client_key.exists():
            raise ImageError("no guest image yet: run `invoke images.build` first")
        key = recipe_hash(paths, recipe, paths.client_key.with_suffix(".pub").read_text())
        directory = entry_dir(paths, recipe, key)
        if not (directory / MANIFEST).is_file():
            raise ImageError(f"no guest image for recipe {recipe.name} ({key}): "
                             f"run `invoke images.build --kernel {recipe.kernel}` first")
        return Image.load(directory)
    except PermissionError as exc:
        raise ImageError(unreadable_advice(paths, Path(exc.filename or paths.cache))) from None


# sudo replaces PATH with its secure_path (Debian's and Ubuntu's default below), so `sudo invoke`
# finds no invoke that a virtualenv installed: name such a command by its full path.
SUDO_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def sudo_command(task: str, argv0: str | None = None, which: Callable[[str], str | None] = shutil.which) -> str:
    """``sudo -E invoke TASK``, with invoke (or the installed ``socklab``) as this user's sudo will find it."""
    name = "socklab" if Path(argv0 if argv0 is not None else sys.argv[0]).name == "socklab" else "invoke"
    found = which(name)
    if found and str(Path(found).parent) not in SUDO_PATH:
        name = shlex.quote(found)
    return f"sudo -E {name} {task}"


def unreadable_advice(paths: Paths, where: Path) -> str:
    """What to run when the image or key was built by root and this user cannot read it."""
    mine = f"{os.getuid()}:{os.getgid()}"
    return (f"{where} is not readable by this user (uid {os.getuid()}): the image was built as root. Either run "
            f"`sudo chown -R {mine} {paths.cache} {paths.keys}`, or rebuild with `{sudo_command('images.build --force')}` "
            "from this user's shell (a build run through sudo hands the entry and the key to the user who ran sudo)")


# Lines of a failed build tool's output that say why: apt's and mmdebstrap's errors, a full disk, the network.
CAUSE = re.compile(r"^(E:|Err:|W: Failed|error:)|No space left|Connection refused|Could not (connect|resolve)|"
                   r"Temporary failure|Failed to fetch|Unable to (fetch|locate)|Permission denied|Read-only file system",
                   re.I)
CAUSE_LINES = 6


def failure_summary(lines: list[str], kept: int = CAUSE_LINES) -> str:
    """The lines that say why a build tool failed (first ``kept`` distinct causes), else its last 3 lines."""
    causes: list[str] = []
    for line in lines:
        text = line.strip()
        if text and CAUSE.search(text) and text not in causes:
            causes.append(text)
    return " | ".join(causes[:kept] if causes else [line for line in lines if line.strip()][-3:])


def _run(argv: list[str], what: str, on_line: Callable[[str], None] | None = None, log: Path | None = None,
         tmpdir: Path | None = None) -> None:
    """Run a build tool; stream its output lines to ``on_line`` (and ``log``); on failure raise with its causes.

    ``tmpdir`` becomes the tool's TMPDIR: mmdebstrap leaves its ``mmdebstrap.gpghome.*`` behind in
    /tmp after every build, so it gets a directory inside the build's own, which goes with it.
    """
    lines: list[str] = []
    env = None
    if tmpdir is not None:
        tmpdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TMPDIR=str(tmpdir))
    log_handle = log.open("w") if log is not None else None
    try:
        with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", env=env) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                if log_handle is not None:
                    log_handle.write(line + "\n")
                lines.append(line)
                if len(lines) > 20000:  # a causes search over the last 20,000 lines is plenty
                    del lines[:10000]
                if on_line:
                    on_line(line)
    finally:
        if log_handle is not None:
            log_handle.close()
    if proc.returncode != 0:
        where = f"; full log: {log}" if log is not None else ""
        raise ImageError(f"{what} failed (exit {proc.returncode}): {failure_summary(lines)}{where}")


def mmdebstrap_argv(recipe: Recipe, target: Path, stage: Path, mirror: str | None) -> list[str]:
    """The mmdebstrap call. No mirror unless the user set one: mmdebstrap's own default applies."""
    argv = [
        "mmdebstrap",
        "--mode=root",
        f"--variant={recipe.variant}",
        "--include=" + ",".join(recipe.packages),
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in recipe.dpkg_excludes),
        *(f"--aptopt={option}" for option in recipe.apt_options),
        f"--customize-hook=sync-in {stage} /",
        '--customize-hook=chroot "$1" /usr/lib/socklab/customize',
        recipe.suite,
        str(target),
    ]
    if mirror:
        argv.append(mirror)
    return argv


def _stage_overlay(paths: Paths, stage: Path, client_pubkey: str) -> str:
    """Lay out the files copied into the guest root; generate its host key. Returns the host public key."""
    shutil.copytree(paths.images / "rootfs", stage, symlinks=True, dirs_exist_ok=True)
    ssh_dir = stage / "etc/ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    host_key = ssh_dir / "ssh_host_ed25519_key"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "socklab-guest", "-f", str(host_key)], "ssh-keygen")
    root_ssh = stage / "root/.ssh"
    root_ssh.mkdir(parents=True, mode=0o700)
    (root_ssh / "authorized_keys").write_text(client_pubkey + "\n")
    return host_key.with_suffix(".pub").read_text().strip()


def _used_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _complete(directory: Path) -> Image | None:
    """The entry at ``directory`` if it is whole and its files still match their recorded digests.

    A damaged entry (a truncated or altered root, kernel or initrd) is reported
    and treated as absent, so it is rebuilt and never booted.
    """
    if not (directory / MANIFEST).is_file():
        return None
    try:
        image = Image.load(directory)
    except ImageError:
        return None
    damaged = image.damaged()
    if damaged:
        progress.say(f"[yellow]warning:[/] cached image {directory.name} is damaged ({', '.join(damaged)} no longer "
                     "match the digests recorded at build time); rebuilding it")
        return None
    return image


def build(paths: Paths, recipe_name: str = "bookworm", mirror: str | None = None, force: bool = False) -> tuple[Image, bool]:
    """Build the image for ``recipe_name`` (or kernel series) unless a complete entry exists.

    Returns (image, built_now). After a build, older entries of the same recipe
    are pruned (each is a 650 MB root plus its snapshots).
    """
    recipe = resolve(paths.images, recipe_name)
    try:
        client_pubkey = ensure_client_key(paths)
        key = recipe_hash(paths, recipe, client_pubkey)
        final = entry_dir(paths, recipe, key)
        if not force and (image := _complete(final)):
            hand_to_invoker(paths, final)  # `sudo invoke images.build` again fixes an entry built before this
            return image, False
    except PermissionError as exc:
        raise ImageError(unreadable_advice(paths, Path(exc.filename or paths.cache))) from None
    if os.geteuid() != 0:
        raise ImageError("building the guest image needs root (mmdebstrap --mode=root, mke2fs -d): "
                         f"run `{sudo_command('images.build')}`")
    hostdeps.ensure(hostdeps.IMAGE_TOOLS, say=progress.say)
    paths.cache.mkdir(parents=True, exist_ok=True)
    with _build_lock(paths):
        # Whoever held the lock before us may have built this very entry.
        if not force and (image := _complete(final)):
            return image, False
        remove_interrupted(paths)
        image = _build_locked(paths, recipe, key, final, client_pubkey, mirror)
        for old in prune(paths, recipe.name, keep=final, client_key=client_key_id(client_pubkey)):
            progress.say(f"pruned the old cache entry {old.name}")
        return image, True


def client_key_id(client_pubkey: str) -> str:
    """A short name of the SSH key an image lets in: which home's images an entry belongs to."""
    return hashlib.sha256(client_pubkey.strip().encode()).hexdigest()[:16]


def prune(paths: Paths, recipe_name: str, keep: Path, client_key: str, in_use: set[Path] | None = None) -> list[Path]:
    """Delete this home's older cache entries of ``recipe_name`` (other than ``keep``), except those a lab boots.

    Only entries built for the same client key (``client_key_id``) are this home's: a shared
    ``SOCKLAB_CACHE`` also holds the images of other checkouts, each with its own key (so its own
    recipe hash), which are no older version of this one and stay. An entry whose manifest names
    no client key (built before the key was recorded) stays too: `invoke images.clean` removes it.
    """
    if in_use is None:
        in_use = images_in_use(paths)
    removed = []
    for entry in sorted(paths.cache.glob(f"{recipe_name}-*")):
        if not entry.is_dir() or entry == keep or entry.resolve() in in_use:
            continue
        if not entry.name.removeprefix(f"{recipe_name}-").isalnum():
            continue  # another recipe whose name starts with this one's and a dash
        if _manifest_client_key(entry) != client_key:
            continue
        for sub in entry.iterdir():
            if sub.is_file():
                sub.chmod(0o644)
        remove_tree(entry)
        removed.append(entry)
    return removed


def _manifest_client_key(entry: Path) -> str | None:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("client_key") if isinstance(manifest, dict) else None


def images_in_use(paths: Paths, proc: Path = Path("/proc")) -> set[Path]:
    """Cache entries a running lab boots from: this home's labs by their state files, and any lab of any
    home or checkout sharing the cache (``SOCKLAB_CACHE``) by the cache paths on its QEMUs' command lines.

    Only reads: another lab's files and processes are never touched.
    """
    used: set[str] = set()
    cache = str(paths.cache.resolve()) + "/"
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if not args or b"qemu-system" not in args[0]:
            continue
        for arg in args:
            text = arg.decode(errors="replace")
            for piece in text.replace(",", "=").split("="):
                if piece.startswith(cache):
                    used.add(cache + piece[len(cache):].split("/", 1)[0])
    for state_file in [paths.home / "run/lab.json", *paths.home.glob("labs/*/run/lab.json")]:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        used |= {state.get("image", "")} | {vm.get("image", "") for vm in state.get("vms", [])}
    return {Path(p).resolve() for p in used if p}


@contextmanager
def _build_lock(paths: Paths) -> Iterator[None]:
    """One build at a time per cache; a second one waits, then finds the first one's entry."""
    with open(paths.cache / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.say("another images.build is running; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build_locked(paths: Paths, recipe: Recipe, key: str, final: Path, client_pubkey: str, mirror: str | None) -> Image:
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{recipe.name}-{key}-", dir=paths.cache))
    try:
        _build_into(paths, recipe, key, work, client_pubkey, mirror)
        # Only now does the old entry (damaged, or a forced rebuild) go: swapped out, then deleted.
        # A lab running on it keeps its open files.
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{final.name}-", dir=paths.cache))
            final.rename(old / final.name)
            work.rename(final)
            remove_tree(old)
        else:
            work.rename(final)
        hand_to_invoker(paths, final)
        return Image.load(final)
    finally:
        if work.exists():
            remove_tree(work)


def hand_to_invoker(paths: Paths, entry: Path, environ: Mapping[str, str] = os.environ,
                    chown: Callable[..., None] = os.chown) -> list[Path]:
    """Give a build run through sudo to the user who ran sudo (SUDO_UID): the entry, the key and the home.

    Without this, the entry (0700) and the key are root's, and the same user's
    rootless ``lab.up`` cannot read them. Returns what was handed over.
    """
    try:
        uid, gid = int(environ["SUDO_UID"]), int(environ.get("SUDO_GID", environ["SUDO_UID"]))
    except (KeyError, ValueError):
        return []
    if os.geteuid() != 0 or uid == 0:
        return []
    handed = []
    trees = [entry, paths.keys, paths.home / "logs", paths.home / "accel-probe.json"]
    tops = [paths.cache, paths.home]
    for top in tops:
        if top.is_dir() and top.stat().st_uid == 0:
            chown(top, uid, gid)
            handed.append(top)
    for tree in trees:
        if not tree.exists() or tree.stat().st_uid == uid:
            continue
        for dirpath, dirnames, filenames in os.walk(tree):
            for name in [*dirnames, *filenames]:
                chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
        chown(tree, uid, gid)
        handed.append(tree)
    return handed


def _build_into(paths: Paths, recipe: Recipe, key: str, work: Path, client_pubkey: str, mirror: str | None) -> Image:
    stage, root = work / "stage", work / "root"
    host_key = _stage_overlay(paths, stage, client_pubkey)
    log = build_log(paths, recipe)
    with progress.step(f"mmdebstrap {recipe.suite} ({len(recipe.packages)} packages)") as step:
        _run(mmdebstrap_argv(recipe, root, stage, mirror), "mmdebstrap",
             on_line=lambda line: step.update(f"mmdebstrap: {line}"), log=log, tmpdir=work / "tmp")
    with progress.step("kernel and initrd"):
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise ImageError("mmdebstrap finished but the guest has no /boot/vmlinuz-*: is a linux-image package in the recipe?")
        release = kernels[-1].name.removeprefix("vmlinuz-")
        if not release_in_series(release, recipe.kernel):
            raise ImageError(f"recipe {recipe.name} says kernel {recipe.kernel}, but suite {recipe.suite} installed "
                             f"{release}: the suite moved on; set `kernel:` in the recipe {recipe.name}.yaml to its series")
        shutil.copyfile(kernels[-1], work / KERNEL)
        files = [ROOTFS, KERNEL, INITRD]
        if pvh.extract(work / KERNEL, work / PVH_KERNEL):
            files.append(PVH_KERNEL)
        try:
            initrd = build_initrd(root, release, list(recipe.initrd_modules), (paths.images / "initrd/init").read_bytes())
        except (KeyError, OSError) as exc:
            raise ImageError(f"cannot build the initrd: {exc}") from exc
        (work / INITRD).write_bytes(initrd)
        # The guest boots the kernel from outside; its own copies only take space.
        for path in (root / "boot").iterdir():
            path.unlink()
    packages = installed_packages(root)
    size_mib = _used_bytes(root) * 13 // 10 // (1 << 20) + recipe.free_space_mib
    with progress.step(f"ext4 root file system ({size_mib} MiB)"):
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "socklab-root", "-J", "size=16", "-d", str(root),
              str(work / ROOTFS), f"{size_mib}M"], "mke2fs")
    remove_tree(root)
    shutil.rmtree(stage)
    shutil.rmtree(work / "tmp", ignore_errors=True)  # mmdebstrap's TMPDIR (its gpg home)
    with progress.step("checksums"):
        sums = {name: file_sha256(work / name) for name in files}
    (work / HOST_KEY).write_text(host_key + "\n")
    for name in files:
        # The base is never written: every VM boots from its own overlay.
        (work / name).chmod(0o444)
    manifest = {"recipe": recipe.name, "recipe_hash": key, "suite": recipe.suite, "kernel_series": recipe.kernel,
                "kernel_release": release, "host_key": host_key, "sha256": sums, "packages": packages,
                "client_key": client_key_id(client_pubkey)}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Image.load(work)


def build_log(paths: Paths, recipe: Recipe) -> Path:
    """Where this build's mmdebstrap output is kept (the latest few per recipe), so a failure can be read whole."""
    logs = paths.ensure_private(paths.home / "logs")
    for old in sorted(logs.glob(f"build-{recipe.name}-*.log"))[:-4]:
        old.unlink(missing_ok=True)
    return logs / f"build-{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
def installed_packages(root: Path) -> dict[str, str]:
    """Package -> version of every package installed in the guest root, read from its dpkg status file."""
    packages: dict[str, str] = {}
    name = None
    try:
        text = (root / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return packages
    for line in text.splitlines():
        if line.startswith("Package: "):
            name = line.removeprefix("Package: ").strip()
        elif line.startswith("Version: ") and name:
            packages[name] = line.removeprefix("Version: ").strip()
    return dict(sorted(packages.items()))


def _mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` (mmdebstrap mounts /proc, /sys, /dev into the root it builds)."""
    prefix = str(path.resolve())
    found: list[str] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point == prefix or mount_point.startswith(prefix + "/"):
            found.append(mount_point)
    return found


def remove_tree(path: Path) -> None:
    """Delete a build directory, unmounting anything a killed mmdebstrap left mounted in it first.

    Without this, deleting an interrupted build could walk into a bind mount of
    the host's own /dev or /sys.
    """
    for mount_point in sorted(_mounts_below(path), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mount_point], stdin=subprocess.DEVNULL, capture_output=True)
    if _mounts_below(path):
        raise ImageError(f"{path}: still has mounts below it; not deleting it")
    shutil.rmtree(path, ignore_errors=True)


def remove_interrupted(paths: Paths) -> list[Path]:
    """Delete the temporary directories of builds that were killed before they could clean up."""
    removed = []
    if paths.cache.is_dir():
        for path in paths.cache.glob(".tmp-*"):
            remove_tree(path)
            removed.append(path)
    return removed


def clean(paths: Paths, keys: bool = False) -> list[Path]:
    """Remove every cache entry (and the client key with ``keys``). Returns what was removed."""
    removed = []
    if paths.cache.is_dir():
        for path in sorted(paths.cache.iterdir()):
            # Only what a build made: <recipe>-<16 hex> entries and .tmp-* leftovers, never a stranger's directory.
            ours = re.fullmatch(r"[\w.-]+-[0-9a-f]{16}", path.name) or path.name.startswith(".tmp-")
            if path.is_dir() and ours:
                for sub in path.iterdir():
                    sub.chmod(0o644) if sub.is_file() else None
                remove_tree(path)
                removed.append(path)
    if keys and paths.keys.is_dir():
        shutil.rmtree(paths.keys)
        removed.append(paths.keys)
    return removed
