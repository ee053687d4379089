"""The image cache: recipe loading, the cache key, the mmdebstrap call, no-op rebuilds, damage checks."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from harness.image import build as image
from harness.errors import ImageError
from harness.paths import PACKAGE_RECIPES, Paths


@pytest.fixture
def paths(tmp_path) -> Paths:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(PACKAGE_RECIPES / "bookworm.yaml", images)
    for tree in ("rootfs", "initrd"):
        shutil.copytree(PACKAGE_RECIPES / tree, images / tree, symlinks=True)
    return Paths(images=images, home=tmp_path / "home")


@pytest.fixture
def pubkey(paths) -> str:
    paths.keys.mkdir(parents=True)
    paths.client_key.write_text("private")
    paths.client_key.with_suffix(".pub").write_text("ssh-ed25519 AAAAtest socklab-client\n")
    return "ssh-ed25519 AAAAtest socklab-client"


def fake_entry(paths: Paths, pubkey: str) -> Path:
    """A complete-looking cache entry for the current recipe, as a finished build leaves it."""
    recipe = image.Recipe.load(paths.images, "bookworm")
    directory = image.entry_dir(paths, recipe, image.recipe_hash(paths, recipe, pubkey))
    directory.mkdir(parents=True)
    sums = {}
    for name in (image.ROOTFS, image.KERNEL, image.INITRD):
        (directory / name).write_bytes(name.encode() * 100)
        sums[name] = image.file_sha256(directory / name)
    manifest = {"recipe": "bookworm", "recipe_hash": "x", "kernel_release": "6.1.0-test",
                "host_key": "ssh-ed25519 AAAAhost", "sha256": sums}
    (directory / image.MANIFEST).write_text(json.dumps(manifest))
    return directory


def test_repository_recipe_loads():
    recipe = image.Recipe.load(PACKAGE_RECIPES, "bookworm")
    assert recipe.suite == "bookworm"
    assert {"openssh-server", "python3", "iproute2", "ethtool", "procps"} <= set(recipe.packages)
    assert any(p.startswith("linux-image-") for p in recipe.packages)


def test_unknown_recipe_lists_the_known_ones(paths):
    with pytest.raises(ImageError, match="unknown image recipe 'trixie'; known: bookworm"):
        image.Recipe.load(paths.images, "trixie")


def test_broken_recipe_names_the_file(paths):
    (paths.images / "bad.yaml").write_text("suite: bookworm\n")
    with pytest.raises(ImageError, match=r"bad.yaml:1: the recipe needs `kernel:`"):
        image.Recipe.load(paths.images, "bad")


def test_hash_is_stable_and_follows_every_input(paths, pubkey):
    recipe = image.Recipe.load(paths.images, "bookworm")
    first = image.recipe_hash(paths, recipe, pubkey)
    assert image.recipe_hash(paths, recipe, pubkey) == first
    assert image.recipe_hash(paths, recipe, "ssh-ed25519 AAAAother") != first
    rc = paths.images / "rootfs/etc/socklab/rc"
    rc.write_text(rc.read_text() + "# changed\n")
    assert image.recipe_hash(paths, recipe, pubkey) != first
    rc.chmod(0o700)
    changed = image.recipe_hash(paths, recipe, pubkey)
    rc.chmod(0o755)
    assert image.recipe_hash(paths, recipe, pubkey) != changed


def test_mmdebstrap_uses_its_own_mirror_unless_one_is_given(paths, tmp_path):
    recipe = image.Recipe.load(paths.images, "bookworm")
    argv = image.mmdebstrap_argv(recipe, tmp_path / "root", tmp_path / "stage", None)
    assert argv[-2:] == ["bookworm", str(tmp_path / "root")]
    assert not any("://" in arg for arg in argv)
    with_mirror = image.mmdebstrap_argv(recipe, tmp_path / "root", tmp_path / "stage", "file:///srv/mirror")
    assert with_mirror[-1] == "file:///srv/mirror"
    assert f"--customize-hook=sync-in {tmp_path / 'stage'} /" in argv


def test_cached_build_is_a_fast_no_op(paths, pubkey, monkeypatch):
    fake_entry(paths, pubkey)
    monkeypatch.setattr(image, "_build_locked", lambda *a: pytest.fail("must not rebuild"))
    started = time.monotonic()
    img, built = image.build(paths)
    assert not built and img.kernel_release == "6.1.0-test"
    assert time.monotonic() - started < 1.0


def test_truncated_entry_is_rebuilt(paths, pubkey, monkeypatch):
    directory = fake_entry(paths, pubkey)
    (directory / image.ROOTFS).write_bytes(b"")
    rebuilt = []
    monkeypatch.setattr(image, "_build_locked", lambda *a: rebuilt.append(a) or "new")
    monkeypatch.setattr(image.os, "geteuid", lambda: 0)
    monkeypatch.setattr(image.hostdeps, "ensure", lambda *a, **k: None)
    assert image.build(paths) == ("new", True)


def test_damage_is_found_by_digest(paths, pubkey):
    directory = fake_entry(paths, pubkey)
    img = image.Image.load(directory)
    assert img.damaged() == []
    with open(directory / image.KERNEL, "r+b") as handle:
        handle.write(b"X")  # same size, different bytes
    assert img.damaged() == [image.KERNEL]


def test_find_without_image_says_how_to_build(paths, pubkey):
    with pytest.raises(ImageError, match="run `invoke images.build --kernel 6.1` first"):
        image.find(paths)


def test_building_needs_root(paths, pubkey, monkeypatch):
    monkeypatch.setattr(image.os, "geteuid", lambda: 1000)
    with pytest.raises(ImageError, match="needs root.*sudo -E .*invoke images.build"):
        image.build(paths)


def test_interrupted_build_dirs_are_removed(paths):
    paths.cache.mkdir(parents=True)
    leftover = paths.cache / ".tmp-bookworm-abc-xyz"
    (leftover / "root/etc").mkdir(parents=True)
    assert image.remove_interrupted(paths) == [leftover]
    assert not leftover.exists()


def test_a_failed_build_leaves_no_entry(paths, pubkey, monkeypatch):
    monkeypatch.setattr(image.os, "geteuid", lambda: 0)
    monkeypatch.setattr(image.hostdeps, "ensure", lambda *a, **k: None)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(image, "_build_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        image.build(paths)
    assert [p.name for p in paths.cache.iterdir()] == [".lock"]


def test_build_tool_failure_quotes_its_last_lines():
    with pytest.raises(ImageError, match="mmdebstrap failed \\(exit 3\\): .*E: cannot find suite"):
        image._run(["sh", "-c", "echo 'I: start'; echo 'E: cannot find suite' >&2; exit 3"], "mmdebstrap")


def test_unchanged_files_are_not_hashed_again(paths, pubkey, monkeypatch):
    img = image.Image.load(fake_entry(paths, pubkey))
    assert img.damaged() == []
    monkeypatch.setattr(image, "file_sha256", lambda path: pytest.fail(f"{path.name} hashed again"))
    assert img.damaged() == []


def test_full_check_finds_a_change_that_hid_its_mtime(paths, pubkey):
    import os

    directory = fake_entry(paths, pubkey)
    img = image.Image.load(directory)
    assert img.damaged() == []
    kernel = directory / image.KERNEL
    before = kernel.stat()
    with open(kernel, "r+b") as handle:
        handle.write(b"X")
    os.utime(kernel, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert img.damaged() == []  # the quick check trusts size, mtime and inode
    assert img.damaged(full=True) == [image.KERNEL]


def test_damaged_entry_is_rebuilt_not_used(paths, pubkey, monkeypatch):
    directory = fake_entry(paths, pubkey)
    with open(directory / image.ROOTFS, "r+b") as handle:
        handle.truncate(10)
    rebuilt = []
    monkeypatch.setattr(image, "_build_locked", lambda *a: rebuilt.append(a) or "new")
    monkeypatch.setattr(image.os, "geteuid", lambda: 0)
    monkeypatch.setattr(image.hostdeps, "ensure", lambda *a, **k: None)
    assert image.build(paths) == ("new", True)
    assert len(rebuilt) == 1


def _forced_build(paths, monkeypatch, build_into):
    monkeypatch.setattr(image.os, "geteuid", lambda: 0)
    monkeypatch.setattr(image.hostdeps, "ensure", lambda *a, **k: None)
    monkeypatch.setattr(image, "_build_into", build_into)
    return image.build(paths, force=True)


def test_a_failed_forced_rebuild_leaves_the_old_entry_and_its_snapshots(paths, pubkey, monkeypatch):
    entry = fake_entry(paths, pubkey)
    (entry / "snapshots/abc").mkdir(parents=True)
    (entry / "snapshots/abc/meta.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in entry.iterdir() if p.is_file()}

    def unreachable_mirror(paths, recipe, key, work, pubkey, mirror):
        (work / "root").mkdir()
        raise ImageError("mmdebstrap failed (exit 1): E: Failed to fetch http://127.0.0.1:9/ Connection refused")

    with pytest.raises(ImageError, match="Connection refused"):
        _forced_build(paths, monkeypatch, unreachable_mirror)
    assert {p.name: p.read_bytes() for p in entry.iterdir() if p.is_file()} == before
    assert (entry / "snapshots/abc/meta.json").exists()
    assert image.Image.load(entry).damaged() == []
    assert sorted(p.name for p in paths.cache.iterdir()) == [".lock", entry.name]


def test_a_forced_rebuild_swaps_the_new_entry_in_only_when_it_is_whole(paths, pubkey, monkeypatch):
    entry = fake_entry(paths, pubkey)
    (entry / "snapshots/old").mkdir(parents=True)
    seen = []

    def new_build(paths, recipe, key, work, pubkey, mirror):
        seen.append((entry / image.MANIFEST).exists())  # the old entry is still there while building
        for name in (image.ROOTFS, image.KERNEL, image.INITRD):
            (work / name).write_bytes(b"new " + name.encode())
        sums = {name: image.file_sha256(work / name) for name in (image.ROOTFS, image.KERNEL, image.INITRD)}
        (work / image.MANIFEST).write_text(json.dumps({"recipe": "bookworm", "recipe_hash": key,
                                                       "kernel_release": "6.1.0-new", "host_key": "k", "sha256": sums}))

    img, built = _forced_build(paths, monkeypatch, new_build)
    assert built and seen == [True]
    assert img.directory == entry and img.kernel_release == "6.1.0-new"
    assert not (entry / "snapshots").exists()  # snapshots of the old image went with it
    assert sorted(p.name for p in paths.cache.iterdir()) == [".lock", entry.name]


def test_build_tool_failure_keeps_the_causes_from_the_middle_of_its_output(tmp_path):
    script = ("echo 'I: downloading'; echo 'E: Failed to fetch http://127.0.0.1:9/dists/bookworm/InRelease "
              "Connection refused'; for i in $(seq 50); do echo \"I: line $i\"; done; "
              "echo 'dpkg: error: No space left on device'; echo 'I: cleaning up'; exit 1")
    log = tmp_path / "build.log"
    with pytest.raises(ImageError) as caught:
        image._run(["sh", "-c", script], "mmdebstrap", log=log)
    message = str(caught.value)
    assert "E: Failed to fetch" in message and "No space left on device" in message
    assert "I: line 7" not in message
    assert message.endswith(f"full log: {log}")
    assert "I: line 50" in log.read_text()


def test_failure_summary_falls_back_to_the_last_lines():
    assert image.failure_summary(["I: a", "I: b", "", "I: c", "I: d"]) == "I: b | I: c | I: d"


def test_a_build_through_sudo_hands_the_entry_and_key_to_the_invoking_user(paths, pubkey, monkeypatch):
    entry = fake_entry(paths, pubkey)
    chowned = []
    monkeypatch.setattr(image.os, "geteuid", lambda: 0)
    handed = image.hand_to_invoker(paths, entry, environ={"SUDO_UID": "1000", "SUDO_GID": "1000"},
                                   chown=lambda path, uid, gid, **k: chowned.append((Path(path), uid, gid)))
    assert entry in handed and paths.keys in handed
    assert (entry / image.ROOTFS, 1000, 1000) in chowned
    assert (paths.client_key, 1000, 1000) in chowned
    assert image.hand_to_invoker(paths, entry, environ={}, chown=lambda *a, **k: pytest.fail("no sudo")) == []


def test_a_rootless_user_who_cannot_read_the_entry_is_told_what_to_run(paths, pubkey, monkeypatch):
    entry = fake_entry(paths, pubkey)

    def denied(directory):
        raise PermissionError(13, "Permission denied", str(directory / image.MANIFEST))

    monkeypatch.setattr(image.Image, "load", staticmethod(denied))
    with pytest.raises(ImageError, match=r"not readable by this user .*sudo chown -R \d+:\d+ .*images.build --force"):
        image.find(paths)
    assert entry.exists()


def test_clean_removes_only_what_a_build_made(paths, pubkey):
    entry = fake_entry(paths, pubkey)
    stranger = paths.cache / "my-notes"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("mine")
    removed = image.clean(paths)
    assert removed == [entry] and (stranger / "keep.txt").exists()


def test_recipes_are_found_by_kernel_series_or_name():
    images = PACKAGE_RECIPES
    assert image.resolve(images, "6.12").name == "trixie" and image.resolve(images, "forky").kernel == "7.2"
    assert image.resolve(images, "6.1").suite == "bookworm"
    with pytest.raises(ImageError, match=r"unknown kernel or image recipe '5\.10'; known: 6\.1 \(bookworm\)"):
        image.resolve(images, "5.10")


def test_a_release_belongs_to_its_series_only():
    assert image.release_in_series("6.1.0-57-cloud-amd64", "6.1")
    assert not image.release_in_series("6.12.118+deb13-cloud-amd64", "6.1")
    assert image.release_in_series("6.12.118+deb13-cloud-amd64", "6.12")
    assert not image.release_in_series("7.3.1+deb14-cloud-amd64", "7.2")


def old_entry(directory: Path, pubkey: str | None) -> Path:
    """A cache entry built earlier, for the home whose client key is ``pubkey`` (None: before keys were recorded)."""
    directory.mkdir()
    (directory / image.ROOTFS).write_bytes(b"x")
    (directory / image.ROOTFS).chmod(0o444)
    manifest = {"recipe": "bookworm", "recipe_hash": directory.name.rsplit("-", 1)[1]}
    if pubkey is not None:
        manifest["client_key"] = image.client_key_id(pubkey)
    (directory / image.MANIFEST).write_text(json.dumps(manifest))
    return directory


def test_prune_removes_older_entries_of_the_recipe_but_not_what_a_lab_boots(paths, pubkey):
    keep = fake_entry(paths, pubkey)
    old, booted, other = (old_entry(paths.cache / name, pubkey) for name in (
        "bookworm-0000000000000001", "bookworm-0000000000000002", "bookwormish-0000000000000003"))
    state = {"image": str(keep), "vms": [{"image": str(booted)}]}
    (paths.home / "labs/second/run").mkdir(parents=True)
    (paths.home / "labs/second/run/lab.json").write_text(json.dumps(state))
    assert image.prune(paths, "bookworm", keep=keep, client_key=image.client_key_id(pubkey),
                       in_use=image.images_in_use(paths, proc=paths.home / "noproc")) == [old]
    assert keep.exists() and booted.exists() and other.exists() and not old.exists()


def test_prune_spares_the_entries_other_homes_built_in_a_shared_cache(paths, pubkey):
    """Another checkout's image has another client key, so another hash: it is no older version of this one."""
    keep = fake_entry(paths, pubkey)
    mine = old_entry(paths.cache / "bookworm-0000000000000011", pubkey)
    theirs = old_entry(paths.cache / "bookworm-0000000000000012", "ssh-ed25519 AAAAother socklab-client")
    unrecorded = old_entry(paths.cache / "bookworm-0000000000000013", None)
    assert image.prune(paths, "bookworm", keep=keep, client_key=image.client_key_id(pubkey), in_use=set()) == [mine]
    assert theirs.exists() and unrecorded.exists()


def test_prune_spares_an_entry_a_qemu_of_another_home_boots(paths, pubkey, tmp_path):
    """A shared SOCKLAB_CACHE: a lab of another checkout has no state file here, but its QEMU names the entry."""
    keep = fake_entry(paths, pubkey)
    theirs, stale = paths.cache / "bookworm-00000000000000aa", paths.cache / "bookworm-00000000000000bb"
    for directory in (theirs, stale):
        old_entry(directory, pubkey)
    proc = tmp_path / "proc"
    for pid, argv in (("4242", [b"/usr/bin/qemu-system-x86_64", b"-kernel", str(theirs / "vmlinuz").encode(),
                                b"-drive", f"file={theirs}/rootfs.ext4,format=raw".encode()]),
                      ("4243", [b"/bin/cat", str(stale / "vmlinuz").encode()])):
        (proc / pid).mkdir(parents=True)
        (proc / pid / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
    in_use = image.images_in_use(paths, proc=proc)
    assert in_use == {theirs.resolve()}
    assert image.prune(paths, "bookworm", keep=keep, client_key=image.client_key_id(pubkey), in_use=in_use) == [stale]
    assert theirs.exists() and not stale.exists()


def test_the_manifest_records_the_packages_a_moving_suite_resolved(tmp_path):
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text("Package: linux-image-7.2.12+deb14-cloud-amd64\nStatus: install ok installed\nVersion: 7.2.12-1\n\n"
                      "Package: busybox-static\nVersion: 1:1.37.0-6\n")
    assert image.installed_packages(tmp_path) == {"busybox-static": "1:1.37.0-6",
                                                  "linux-image-7.2.12+deb14-cloud-amd64": "7.2.12-1"}


def test_a_build_tool_gets_a_tmpdir_of_the_build_s_own(tmp_path):
    """mmdebstrap leaves mmdebstrap.gpghome.* in its TMPDIR: it must be the build's, not /tmp."""
    where = tmp_path / "work" / "tmp"
    lines: list[str] = []
    image._run(["sh", "-c", 'echo "$TMPDIR"'], "mmdebstrap", on_line=lines.append, tmpdir=where)
    assert lines == [str(where)] and where.is_dir()


def test_the_sudo_advice_names_a_virtualenv_command_by_its_path():
    """sudo's secure_path has no virtualenv in it: `sudo invoke` would not be found there."""
    venv = "/home/ann/socklab/.venv/bin/invoke"
    assert image.sudo_command("images.build", "invoke", lambda name: venv) == f"sudo -E {venv} images.build"
    assert image.sudo_command("images.build", "invoke", lambda name: "/usr/local/bin/invoke") == \
        "sudo -E invoke images.build"
    assert image.sudo_command("images.build", "/usr/bin/socklab", lambda name: f"/usr/bin/{name}") == \
        "sudo -E socklab images.build"
    assert image.sudo_command("images.build", "invoke", lambda name: None) == "sudo -E invoke images.build"
