"""socklab's settings in invoke's config files (invoke.yaml), with their defaults, checked before any task runs.

invoke reads the project's invoke.yaml after importing tasks.py, and reads it
with ``yaml.load``: a tab, a binary file or ``lab: 5`` would end in invoke's
own traceback. tasks.py calls ``check_files`` at import, so every file invoke
is about to read is checked first with socklab's loader and a problem is one
``socklab:`` line. (The user's ``~/.invoke.yaml`` and ``/etc/invoke.yaml``
are read by invoke before tasks.py is imported: a syntax error there still
gives invoke's traceback; a wrongly typed value is caught here.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from . import load as textio
from .errors import SocklabError
from .host.accel import ACCELS
from .host.net import SEGMENT_MODES
from .lab.topology import builtin_names

# The settings tasks.py reads (`c.config.lab.topology`, ...), with their defaults.
DEFAULTS: dict[str, dict[str, Any]] = {
    # images.dir and lab.labs_dir: where recipes and labs are (harness/paths.py gives the precedence).
    "images": {"recipe": "bookworm", "mirror": None, "dir": None},
    "lab": {"topology": "default", "accel": "auto", "segment": "auto", "labs_dir": None},
    "results": {"dir": None},
}
# invoke's own top-level sections (invoke.Config.global_defaults()); each is a mapping.
INVOKE_SECTIONS = ("run", "runners", "sudo", "tasks", "timeouts")
SUFFIXES = (".yaml", ".yml", ".json")


class ConfigError(SocklabError):
    """An invoke config file is malformed or sets a socklab setting to something unusable."""


def _choices() -> dict[tuple[str, str], tuple[str, ...]]:
    return {("lab", "topology"): tuple(builtin_names()), ("lab", "accel"): ACCELS, ("lab", "segment"): SEGMENT_MODES}


def files_invoke_reads(project_dir: Path, argv: list[str], environ: Mapping[str, str]) -> list[Path]:
    """The config files invoke will load for this command: system, user, project and runtime (-f)."""
    found = []
    for prefix in (Path("/etc/invoke"), Path.home() / ".invoke", project_dir / "invoke"):
        found += [prefix.with_name(prefix.name + suffix) for suffix in SUFFIXES]
    runtime = environ.get("INVOKE_RUNTIME_CONFIG")
    for arg, value in _core_flags(argv[1:]):
        if arg in ("-f", "--config"):
            runtime = value
        elif arg.startswith("--config="):
            runtime = arg.split("=", 1)[1]
    # lexists, not Path.exists: a HOME the user cannot search raises PermissionError from exists().
    candidates = [path for path in found if os.path.lexists(path)]
    return candidates + ([Path(runtime)] if runtime else [])


# invoke's core flags that take a value (`invoke --help`); they come before the first task name.
_VALUE_FLAGS = {"-c", "--collection", "-f", "--config", "-r", "--search-root", "-T", "--command-timeout",
                "--hide", "-D", "--list-depth", "-F", "--list-format", "--print-completion-script"}


def _core_flags(args: list[str]) -> Iterator[tuple[str, str | None]]:
    """(flag, value) of invoke's own flags: those before the first task name or `--`. A task's
    arguments (`lab.exec server -- rm -f x`) are not invoke's."""
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--" or not arg.startswith("-"):
            return
        if arg in _VALUE_FLAGS and index + 1 < len(args):
            yield arg, args[index + 1]
            index += 2
            continue
        yield arg, None
        index += 1


def check_files(paths: Iterable[Path]) -> None:
    """Each file read and checked; the first problem is a ConfigError naming file and line."""
    for path in paths:
        check(path)


def check(path: Path) -> None:
    where = str(path)
    text = textio.read_text(path, "invoke config file", error=ConfigError)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where}:{getattr(exc, 'lineno', 1)}: malformed JSON: {exc.args[0].split(':')[0]}") from None
    else:
        data = textio.parse_yaml(text, where, error=ConfigError)
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{where}:1: an invoke config file is a mapping of sections (images:, lab:, run:, ...), "
                          f"not {textio.describe_type(data)}")
    line = data.line_of if isinstance(data, textio.YamlMap) else (lambda key: 1)
    textio.check_keys(data, (*DEFAULTS, *INVOKE_SECTIONS), where, "section", error=ConfigError)
    for section, value in data.items():
        if value is None:
            continue
        textio.expect_type(value, dict, where, line(section), section, error=ConfigError)
        if section in DEFAULTS:
            _check_section(section, value, where, value.line_of if isinstance(value, textio.YamlMap) else line)


def _check_section(section: str, values: dict, where: str, line) -> None:
    textio.check_keys(values, DEFAULTS[section], where, f"setting of {section}:", error=ConfigError)
    choices = _choices()
    for key, value in values.items():
        if value is None and DEFAULTS[section][key] is None:
            continue
        textio.expect_type(value, str, where, line(key), f"{section}: {key}", error=ConfigError)
        known = choices.get((section, key))
        if (section, key) == ("lab", "topology") and value.endswith((".yaml", ".yml")):
            continue  # a topology file of the user's own; lab.up reads and checks it
        if known and value not in known:
            raise ConfigError(f"{where}:{line(key)}: `{section}: {key}: {value}`{textio.did_you_mean(value, known)}")


def check_at_import(project_dir: Path) -> None:
    """What tasks.py runs when imported: check, and on a problem print one line and exit 2."""
    import sys

    try:
        check_files(files_invoke_reads(project_dir, sys.argv, os.environ))
    except ConfigError as exc:
        from rich.markup import escape

        from . import progress

        progress.console.print(f"[red]socklab:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
