"""harness/config.py: the invoke config files a command will read are checked before invoke reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import config
from harness.config import ConfigError, check, files_invoke_reads


@pytest.mark.parametrize("text, message", [
    ("lab: [1\n", r"invoke\.yaml:2: malformed YAML: expected ',' or '\]'"),
    ("lab:\n\ttopology: single\n", r"invoke\.yaml:2: malformed YAML: found character '\\t'"),
    ("lab: 5\n", r"invoke\.yaml:1: `lab:` must be a mapping, not 5$"),
    ("- 1\n", r"invoke\.yaml:1: an invoke config file is a mapping of sections .*, not a list$"),
    ("lab: {topology: [a]}\n", r"invoke\.yaml:1: `lab: topology:` must be a string, not a list$"),
    ("lab:\n  topolgy: single\n", r"invoke\.yaml:2: unknown setting of lab: 'topolgy'; did you mean 'topology'\?$"),
    ("lab: {accel: hvf}\n", r"invoke\.yaml:1: `lab: accel: hvf`; known: auto, kvm, tcg$"),
    ("labs: {}\n", r"invoke\.yaml:1: unknown section 'labs'; did you mean 'lab'\?$"),
    ("run: 3\n", r"invoke\.yaml:1: `run:` must be a mapping, not 3$"),
    ("a: &x 1\nb: *x\n", r"invoke\.yaml:2: YAML aliases"),
])
def test_a_bad_invoke_yaml_is_one_line_with_file_and_line(tmp_path, text, message):
    path = tmp_path / "invoke.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        check(path)
    assert "\n" not in str(caught.value)


def test_binary_and_json_config_files_are_named(tmp_path):
    (tmp_path / "invoke.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"invoke\.yaml:1: not UTF-8 text"):
        check(tmp_path / "invoke.yaml")
    (tmp_path / "invoke.json").write_text('{"lab": ')
    with pytest.raises(ConfigError, match=r"invoke\.json:1: malformed JSON: Expecting value"):
        check(tmp_path / "invoke.json")


def test_good_settings_pass(tmp_path):
    path = tmp_path / "invoke.yaml"
    path.write_text("lab: {topology: single, accel: tcg}\nimages: {mirror: null}\nrun: {echo: true}\n")
    check(path)


def test_the_files_invoke_reads_include_project_and_runtime_ones(tmp_path):
    (tmp_path / "invoke.yml").write_text("")
    found = files_invoke_reads(tmp_path, ["invoke", "-f", "/x/run.yaml", "lab.up"], {})
    assert tmp_path / "invoke.yml" in found and Path("/x/run.yaml") in found
    assert Path("/y.yaml") in files_invoke_reads(tmp_path, ["invoke"], {"INVOKE_RUNTIME_CONFIG": "/y.yaml"})


def test_a_task_s_own_f_flag_is_not_taken_for_invoke_s():
    argv = ["invoke", "--echo", "lab.exec", "server", "--", "rm", "-f", "/run/fill"]
    assert Path("/run/fill") not in files_invoke_reads(Path("/nonexistent"), argv, {})
    argv = ["invoke", "-c", "tasks", "-f", "/x.yaml", "lab.exec", "server", "--", "rm", "-f", "/y"]
    found = files_invoke_reads(Path("/nonexistent"), argv, {})
    assert Path("/x.yaml") in found and Path("/y") not in found


def test_the_defaults_are_what_the_checks_accept(tmp_path):
    import yaml

    path = tmp_path / "invoke.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.DEFAULTS.items()}))
    check(path)
