"""harness/load.py: every input is UTF-8 text, YAML within its caps, or one line."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from harness import load
from harness.load import InputError, check_keys, expect_type, parse_yaml, read_text


# -- read_text -------------------------------------------------------------------------------------------

def test_text_is_read_as_utf8_without_a_bom(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_bytes("\ufeffname: café\n".encode())
    assert read_text(path) == "name: café\n"


@pytest.mark.parametrize("content, message", [
    (b"name: x\n\xff\xfe\n", r"s\.yaml:2: not UTF-8 text \(byte 0xff\)$"),
    (b"a\nb\n\0\n", r"s\.yaml:3: not a text file \(a NUL byte\)$"),
])
def test_binary_content_is_named_with_its_line(tmp_path, content, message):
    path = tmp_path / "s.yaml"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_text(path)


def test_a_directory_is_a_directory_not_a_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read the scenario: is a directory$"):
        read_text(tmp_path, "scenario")
    with pytest.raises(InputError, match="cannot read the scenario: No such file or directory$"):
        read_text(tmp_path / "nope", "scenario")


def test_a_huge_file_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "MAX_FILE_BYTES", 10)
    path = tmp_path / "s.yaml"
    path.write_text("x" * 11)
    with pytest.raises(InputError, match="larger than"):
        read_text(path)


@pytest.fixture
def world_readable_dir():
    # Traversable by any user, unlike pytest's tmp_path (under a 0700 directory of root's).
    directory = Path(tempfile.mkdtemp(prefix="socklab-load-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def as_nobody(function, *args) -> str:
    """``function(*args)`` in a forked child that dropped to uid/gid 65534: its error message, or "ok"."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec, so harness stays imported from this tree
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            function(*args)
            message = "ok"
        except Exception as exc:  # noqa: BLE001 - whatever it is, the parent asserts on it
            message = f"{type(exc).__name__}: {exc}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_an_unreadable_file_is_named_as_such_for_a_non_root_user(world_readable_dir):
    path = world_readable_dir / "secret.yaml"
    path.write_text("a: 1\n")
    path.chmod(0o600)
    assert as_nobody(read_text, path, "scenario") == \
        f"InputError: {path}: cannot read the scenario: permission denied (running as uid 65534)"
    path.chmod(0o644)
    assert as_nobody(read_text, path, "scenario") == "ok"


# -- parse_yaml ------------------------------------------------------------------------------------------

def test_mappings_and_lists_know_their_lines():
    data = parse_yaml("a: 1\nsteps:\n  - {on: x}\n  - b\n", "f", first_line=10)
    assert data.line == 10 and data.line_of("steps") == 11
    assert data["steps"].line_of(0) == 12 and data["steps"].line_of(1) == 13
    assert data["steps"][0] == {"on": "x"}  # YAML 1.2 booleans: `on` stays a string key


@pytest.mark.parametrize("text, message", [
    ("a: &x [1]\nb: *x\n", r"^f:2: YAML aliases \(\*x\) are not allowed"),
    ("a: 1\nb: 2\na: 3\n", r"^f:3: duplicate key 'a' \(first at line 1\)$"),
    ("a: " + "[" * 40 + "]" * 40, r"^f:1: nested deeper than 32 levels$"),
    ("a: " + "[" * 200000, r"^f:1: nested deeper than 32 levels$"),  # libyaml's own composer would crash here
    ("a: " + "9" * 5000, r"^f:1: integer 9{20}… is too large \(at most 64 bits\)$"),
    ("a: 36893488147419103232\n", r"^f:1: integer 36893488147419103232 is too large"),
    ("a: !!binary aGk=\n", r"^f:1: YAML tag !!binary is not allowed"),
    ("a: !!python/object/apply:os.system [id]\n", r"^f:1: YAML tag !!python/object/apply:os.system is not allowed"),
    ("? [a]\n: 1\n", r"^f:1: a mapping key must be a plain value"),
    ("a: [1, 2\nb: c: d\n", r"^f:2: malformed YAML: expected ',' or '\]', but got ':'$"),
    ("a: 1\n---\nb: 2\n", r"^f:2: a second YAML document"),
    ("a:\n\tb: 1\n", r"^f:2: malformed YAML: found character '\\t' that cannot start any token$"),
    ("a: \x07\n", r"^f:1: malformed YAML: character #x07 is not allowed$"),
])
def test_yaml_past_a_cap_or_malformed_is_one_line(text, message):
    with pytest.raises(InputError, match=message) as caught:
        parse_yaml(text, "f")
    assert "\n" not in str(caught.value)


def test_an_alias_bomb_is_refused_at_the_first_alias_in_no_time():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    started = time.monotonic()
    with pytest.raises(InputError, match="aliases"):
        parse_yaml(bomb, "f")
    assert time.monotonic() - started < 1


def test_timestamps_and_merge_keys_are_read_as_text():
    assert parse_yaml("d: 2024-01-01\n<<: 1\n", "f") == {"d": "2024-01-01", "<<": 1}


# -- shape checks ----------------------------------------------------------------------------------------

def test_unknown_key_gets_a_did_you_mean_at_its_line():
    data = parse_yaml("steps: []\nsysctl: {}\n", "f")
    with pytest.raises(InputError, match=r"^f:2: unknown body key 'sysctl'; did you mean 'sysctls'\?$"):
        check_keys(data, ("sysctls", "steps"), "f", "body key")
    with pytest.raises(InputError, match=r"^f:2: unknown key 'sysctl'; known: steps, zzz$"):
        check_keys(data, ("steps", "zzz"), "f")


def test_a_list_where_a_mapping_belongs_is_named_with_both_types():
    data = parse_yaml("params: [1, 2]\nname: 3\n", "f")
    with pytest.raises(InputError, match=r"^f:1: `params:` must be a mapping, not a list$"):
        expect_type(data["params"], dict, "f", data.line_of("params"), "params")
    with pytest.raises(InputError, match=r"^f:2: `name:` must be a string, not 3$"):
        expect_type(data["name"], str, "f", data.line_of("name"), "name")
    with pytest.raises(InputError, match=r"must be an integer, not True"):
        expect_type(True, int, "f", 1, "n")
