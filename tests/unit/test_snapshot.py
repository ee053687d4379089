"""Ready snapshots: the key follows everything a saved guest depends on; damaged ones are refused."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from harness.vm import qemu
from harness.vm import vmstate as snapshot


@pytest.fixture
def spec(tmp_path) -> qemu.VMSpec:
    return qemu.VMSpec(
        name="server", run_dir=tmp_path, kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img",
        overlay=tmp_path / "server.qcow2", ssh_port=40022, mgmt_mac="52:54:00:00:00:02",
        lab_ip="198.51.100.2/24", lab_nic=qemu.LabNic("tap", "52:54:00:5a:00:02", ifname="slabc1231"),
    )


DIGESTS = {"rootfs.ext4": "a" * 64, "vmlinuz": "b" * 64, "initrd.img": "c" * 64}


def key(spec, digests=DIGESTS, version="QEMU emulator version 7.2.22"):
    return snapshot.snapshot_key(digests, spec, version)


def test_host_side_details_do_not_change_the_key(spec, tmp_path):
    moved = replace(spec, ssh_port=50000, run_dir=tmp_path / "elsewhere",
                    lab_nic=replace(spec.lab_nic, ifname="slffffff1"), incoming=tmp_path / "x")
    assert key(moved) == key(spec)


@pytest.mark.parametrize("change", [
    lambda s: replace(s, memory_mib=1024),
    lambda s: replace(s, cpus=2),
    lambda s: replace(s, accel="kvm"),
    lambda s: replace(s, lab_ip="198.51.100.9/24"),
    lambda s: replace(s, mgmt_mac="52:54:00:00:00:09"),
    lambda s: replace(s, lab_nic=replace(s.lab_nic, mode="socket")),
    lambda s: replace(s, extra_append=("debug",)),
    lambda s: replace(s, lab_nic=None),
])
def test_vm_configuration_changes_the_key(spec, change):
    assert key(change(spec)) != key(spec)


def test_image_or_qemu_changes_the_key(spec):
    assert key(spec, digests={**DIGESTS, "vmlinuz": "d" * 64}) != key(spec)
    assert key(spec, version="QEMU emulator version 8.2.0") != key(spec)


def write_snapshot(directory: Path, state=b"S" * 1000, disk=b"D" * 300,
                   fmt: int = snapshot.SNAPSHOT_FORMAT) -> snapshot.SavedVM:
    directory.mkdir(parents=True)
    (directory / snapshot.STATE).write_bytes(state)
    (directory / snapshot.DISK).write_bytes(disk)
    meta = {"format": fmt, "state_size": len(state), "disk_size": len(disk),
            "state_sha256": snapshot.file_sha256(directory / snapshot.STATE)}
    (directory / snapshot.META).write_text(json.dumps(meta))
    return snapshot.SavedVM(directory)


def test_whole_snapshot_is_usable(tmp_path):
    assert write_snapshot(tmp_path / "k").problem() is None


def test_missing_snapshot_is_just_missing(tmp_path):
    assert snapshot.SavedVM(tmp_path / "none").problem() == "missing"


def test_truncated_state_is_refused(tmp_path):
    snap = write_snapshot(tmp_path / "k")
    snap.state.write_bytes(b"S" * 10)
    assert "has 10 bytes, 1000 were saved" in snap.problem()


def test_corrupt_state_of_the_same_size_is_refused(tmp_path):
    snap = write_snapshot(tmp_path / "k")
    snap.state.write_bytes(b"X" * 1000)
    assert "does not match its recorded digest" in snap.problem()


def test_missing_disk_is_refused(tmp_path):
    snap = write_snapshot(tmp_path / "k")
    snap.disk.unlink()
    assert snap.problem() == "disk.qcow2 is missing"


def test_store_discard_removes_it(tmp_path):
    store = snapshot.SavedVMStore(tmp_path)
    write_snapshot(store.root / "abc")
    store.discard("abc")
    assert store.get("abc").problem() == "missing"


def _fake_migrate(content: bytes = b"S" * 1000, before_write=None):
    def migrate(qmp_socket, target):
        if before_write:
            before_write(target)
        target.write_bytes(content)
    return migrate


def test_a_save_is_written_aside_then_renamed_into_place(tmp_path, monkeypatch):
    store = snapshot.SavedVMStore(tmp_path)
    overlay = tmp_path / "server.qcow2"
    overlay.write_bytes(b"D" * 300)
    seen = []
    monkeypatch.setattr(qemu, "migrate_to_file", _fake_migrate(before_write=lambda target: seen.append(target.parent)))
    snap = store.save("abc", tmp_path / "qmp", overlay)
    assert snap.problem() is None
    work = seen[0]
    assert work.parent == store.root and work.name.startswith(f".tmp-abc-{os.getpid()}-") and not work.exists()


def test_a_failed_save_leaves_neither_a_snapshot_nor_its_temporary_files(tmp_path, monkeypatch):
    store = snapshot.SavedVMStore(tmp_path)
    (tmp_path / "server.qcow2").write_bytes(b"D")

    def fails(qmp_socket, target):
        target.write_bytes(b"half")
        raise qemu.LabError("saving the guest state failed: boom")

    monkeypatch.setattr(qemu, "migrate_to_file", fails)
    with pytest.raises(qemu.LabError):
        store.save("abc", tmp_path / "qmp", tmp_path / "server.qcow2")
    assert list(store.root.iterdir()) == []


def test_a_save_removes_the_snapshots_of_older_formats_only(tmp_path, monkeypatch):
    store = snapshot.SavedVMStore(tmp_path)
    older = write_snapshot(store.root / "old", fmt=snapshot.SNAPSHOT_FORMAT - 1)
    current = write_snapshot(store.root / "other")
    saving = store.root / ".tmp-xyz-1-2-abc"  # another lab's save in progress: no meta yet
    saving.mkdir()
    (tmp_path / "server.qcow2").write_bytes(b"E" * 300)
    monkeypatch.setattr(qemu, "migrate_to_file", _fake_migrate(b"T" * 1000))
    store.save("new", tmp_path / "qmp", tmp_path / "server.qcow2")
    assert not older.directory.exists()
    assert current.problem() is None and saving.is_dir() and store.get("new").problem() is None


def test_a_save_records_what_the_guest_keeps_running(tmp_path, monkeypatch):
    store = snapshot.SavedVMStore(tmp_path)
    (tmp_path / "server.qcow2").write_bytes(b"E" * 300)
    monkeypatch.setattr(qemu, "migrate_to_file", _fake_migrate(b"T" * 1000))
    saved = store.save("k", tmp_path / "qmp", tmp_path / "server.qcow2", {"wake-listener", "agent-server"})
    assert saved.running == {"agent-server", "wake-listener"} and saved.problem() is None
    assert store.save("j", tmp_path / "qmp", tmp_path / "server.qcow2").running == frozenset()
    assert write_snapshot(tmp_path / "written-without").running == frozenset()  # no "running": nothing assumed


def test_a_snapshot_another_lab_saved_meanwhile_is_kept(tmp_path, monkeypatch):
    store = snapshot.SavedVMStore(tmp_path)
    existing = write_snapshot(store.root / "abc")
    inode = existing.disk.stat().st_ino
    (tmp_path / "server.qcow2").write_bytes(b"E" * 300)
    monkeypatch.setattr(qemu, "migrate_to_file", _fake_migrate(b"T" * 1000))
    store.save("abc", tmp_path / "qmp", tmp_path / "server.qcow2")
    assert existing.disk.stat().st_ino == inode  # a lab restored from it may have it open as its backing file
    assert [p.name for p in store.root.iterdir()] == ["abc"]


def test_leftovers_of_a_killed_save_are_removed_but_a_live_save_is_not(tmp_path):
    import subprocess
    import sys

    from harness.vm import owner

    store = snapshot.SavedVMStore(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = os.getpid()
    killed = store.root / f".tmp-abc-{dead.pid}-123-x1"
    recycled = store.root / f".tmp-abc-{me}-{owner.start_ticks(me) + 1}-x2"  # our pid, another start time
    old_layout = store.root / ".tmp-abc"
    live = store.root / f".tmp-def-{me}-{owner.start_ticks(me)}-x3"
    for path in (killed, recycled, old_layout, live):
        (path / "sub").mkdir(parents=True)
        (path / snapshot.STATE).write_bytes(b"half")
    removed = store.remove_interrupted()
    assert sorted(removed) == sorted([killed, recycled, old_layout])
    assert live.exists()


def test_a_verified_state_is_not_hashed_again_until_it_changes(tmp_path, monkeypatch):
    """The digest is checked once; later restores trust size, mtime and inode, as image files do."""
    snap = write_snapshot(tmp_path / "k")
    hashed = []
    real = snapshot.file_sha256
    monkeypatch.setattr(snapshot, "file_sha256", lambda path: hashed.append(path) or real(path))
    assert snap.problem() is None and len(hashed) == 1
    assert snap.problem() is None and len(hashed) == 1  # trusted: nothing moved
    data = snap.state.read_bytes()
    snap.state.write_bytes(b"X" * len(data))
    os.utime(snap.state, ns=(time.time_ns(), time.time_ns() + 10_000_000))  # a write moves the mtime
    assert "does not match its recorded digest" in snap.problem() and len(hashed) == 2
    snap.state.write_bytes(data)
    os.utime(snap.state, ns=(time.time_ns(), time.time_ns() + 20_000_000))
    assert snap.problem() is None and len(hashed) == 3
    (snap.directory / snapshot.VERIFIED).write_text("not json")
    assert snap.problem() is None and len(hashed) == 4
