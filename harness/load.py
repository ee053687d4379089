"""Read every file socklab takes as input safely: any bad input becomes one line naming the file and line.

Scenarios, lab.yaml, expectation templates, image recipes, ``--param`` values,
invoke.yaml and the lab's state file all come through here:

- ``read_text``: UTF-8 text of at most ``MAX_FILE_BYTES``; a directory, a
  missing or unreadable file, or binary content is named as such.
- ``parse_yaml``: YAML with no aliases (an alias bomb expands exponentially),
  no duplicate keys (the second would silently win), nesting at most
  ``MAX_DEPTH`` deep, integers within 64 bits (past Python's digit limit
  ``int()`` raises), only the plain tags (no ``!!binary``, ``!!set``), and
  YAML 1.2 booleans (``on:`` stays a string key). Mappings and lists come back
  as ``YamlMap`` and ``YamlList``, which know the line of every entry.
- ``check_keys`` and ``expect_type``: unknown keys with a "did you mean", and
  a field of the wrong type, at file:line.

Templates (jinja2, sandboxed and budgeted) are ``harness.template``'s: jinja2
costs tens of milliseconds to import, and ``lab.up`` reads YAML but renders
no template.
"""

from __future__ import annotations

import difflib
import gc
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import (AliasEvent, MappingEndEvent, MappingStartEvent, ScalarEvent, SequenceEndEvent,
                         SequenceStartEvent, StreamEndEvent)
from yaml.resolver import Resolver

from .errors import SocklabError

MAX_FILE_BYTES = 4 << 20        # a scenario of 20,000 steps is about 1.6 MB
MAX_DEPTH = 32                  # nesting of YAML collections; real files use 4
INT_LIMIT = 1 << 64             # |int| below this: every socket-layer quantity fits in 64 bits


class InputError(SocklabError):
    """An input file (or value) is malformed; the message names the file and line."""


# -- text ------------------------------------------------------------------------------------------------


def read_text(path: Path, what: str = "file", error: type[SocklabError] = InputError) -> str:
    """The UTF-8 text of ``path``; anything else is ``error`` naming the path and what is wrong."""
    def fail(reason: str) -> SocklabError:
        return error(f"{path}: cannot read the {what}: {reason}")

    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except IsADirectoryError:
        raise fail("is a directory") from None
    except FileNotFoundError:
        raise fail("No such file or directory") from None
    except PermissionError:
        raise fail(f"permission denied (running as uid {os.geteuid()})") from None
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from None
    if len(data) > MAX_FILE_BYTES:
        raise fail(f"larger than {MAX_FILE_BYTES >> 20} MiB")
    if b"\0" in data:
        line = data[:data.index(b"\0")].count(b"\n") + 1
        raise error(f"{path}:{line}: not a text file (a NUL byte)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None
    return text.removeprefix("\ufeff")


# -- YAML ------------------------------------------------------------------------------------------------


class YamlMap(dict):
    """A YAML mapping that knows its own line and the line of each key (1-based, in the file)."""

    line: int = 0
    key_lines: dict

    def line_of(self, key: Any) -> int:
        return getattr(self, "key_lines", {}).get(key, self.line)


class YamlList(list):
    """A YAML sequence that knows its own line and the line of each item."""

    line: int = 0
    item_lines: list

    def line_of(self, index: int) -> int:
        lines = getattr(self, "item_lines", [])
        return lines[index] if 0 <= index < len(lines) else self.line


def line_of(value: Any, default: int = 1) -> int:
    """The file line of a mapping or list from ``parse_yaml``; ``default`` for anything else."""
    return getattr(value, "line", 0) or default


class _Limit(yaml.MarkedYAMLError):
    """A YAML input past one of our caps (not a syntax error: no "malformed" in front)."""


def _mark(mark: object) -> yaml.Mark | None:
    """An event's mark as PyYAML's ``Mark``: libyaml's ``yaml._yaml.Mark`` is another class with the same fields."""
    return cast("yaml.Mark | None", mark)


class _Resolver(Resolver):
    """YAML 1.2 booleans (true/false only): in YAML 1.1 the key ``on:`` of every step would be True."""


_Resolver.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in Resolver.yaml_implicit_resolvers.items()
}
_Resolver.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                list("tTfF"))

_PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map")}


class _Parser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's own parser: ten times slower than libyaml's, but its messages say what it found."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


_PARSERS: list[type] = [_Parser]
if getattr(yaml, "__with_libyaml__", False):
    # libyaml parses into events without recursion; its composer (yaml.CSafeLoader) recurses in C
    # and crashes the interpreter on deep input, so the tree is built here, from the events.
    from yaml._yaml import CParser

    _PARSERS.insert(0, CParser)

_RESOLVER = _Resolver()
_CONSTRUCTOR = SafeConstructor()


def _scalar(event: ScalarEvent, cache: dict) -> Any:
    """The value of a scalar event: its tag resolved (plain tags only), then constructed."""
    tag = event.tag
    if tag in (None, "!"):
        tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag not in _PLAIN_TAGS:  # timestamps, `<<`, `=`: read as the text they are
            tag = "tag:yaml.org,2002:str"
    else:
        tag = _full_tag(tag)
        if tag not in _PLAIN_TAGS:
            raise _Limit(None, None, f"YAML tag {_short_tag(tag)} is not allowed (plain values, lists and mappings only)",
                         _mark(event.start_mark))
    key = (tag, event.value)
    if key in cache:
        return cache[key]
    if tag == "tag:yaml.org,2002:int":
        digits = re.sub(r"[^0-9a-fA-F]", "", event.value)
        if len(digits) > 40:
            raise _Limit(None, None, f"integer {event.value[:20]}… is too large (at most 64 bits)", _mark(event.start_mark))
    node = yaml.ScalarNode(tag, event.value, _mark(event.start_mark), _mark(event.end_mark), event.style)
    try:
        value = _CONSTRUCTOR.construct_object(node)
    except (ValueError, TypeError, yaml.YAMLError):
        raise _Limit(None, None, f"{event.value!r} is not a valid {_short_tag(tag)}", _mark(event.start_mark)) from None
    if isinstance(value, int) and not -INT_LIMIT < value < INT_LIMIT:
        raise _Limit(None, None, f"integer {value} is too large (at most 64 bits)", _mark(event.start_mark))
    cache[key] = value
    return value


def _full_tag(tag: str) -> str:
    return tag.replace("!!", "tag:yaml.org,2002:", 1) if tag.startswith("!!") else tag


def _short_tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


def _build(parser: Any, first_line: int) -> Any:
    """The one document of ``parser``'s events as YamlMap/YamlList/scalars, built without recursion."""
    parser.get_event()  # StreamStart
    if parser.check_event(StreamEndEvent):
        return None
    parser.get_event()  # DocumentStart
    cache: dict = {}
    stack: list[list] = []  # [container, pending key or _NO_KEY]
    root: Any = None
    done = False
    while not done:
        event = parser.get_event()
        line = event.start_mark.line + first_line
        if isinstance(event, AliasEvent):
            raise _Limit(None, None, f"YAML aliases (*{event.anchor}) are not allowed: write the value out",
                         _mark(event.start_mark))
        if isinstance(event, (MappingStartEvent, SequenceStartEvent)):
            if event.tag not in (None, "!") and _full_tag(event.tag) not in _PLAIN_TAGS:
                raise _Limit(None, None, f"YAML tag {_short_tag(_full_tag(event.tag))} is not allowed "
                             "(plain values, lists and mappings only)", _mark(event.start_mark))
            if len(stack) >= MAX_DEPTH:
                raise _Limit(None, None, f"nested deeper than {MAX_DEPTH} levels", _mark(event.start_mark))
            container: Any = YamlMap() if isinstance(event, MappingStartEvent) else YamlList()
            container.line = line
            if isinstance(container, YamlMap):
                container.key_lines = {}
            else:
                container.item_lines = []
            stack.append([container, _NO_KEY, event.start_mark])
            continue
        if isinstance(event, (MappingEndEvent, SequenceEndEvent)):
            value, _key, mark = stack.pop()
            line = value.line
        elif isinstance(event, ScalarEvent):
            value, mark = _scalar(event, cache), event.start_mark
        else:
            raise _Limit(None, None, f"unexpected YAML event {type(event).__name__}", _mark(event.start_mark))
        if not stack:
            root, done = value, True
            continue
        top = stack[-1]
        parent = top[0]
        if isinstance(parent, YamlList):
            parent.append(value)
            parent.item_lines.append(line)
        elif top[1] is _NO_KEY:
            try:
                hash(value)
            except TypeError:
                raise _Limit(None, None, f"a mapping key must be a plain value, not {plain(value)!r}", mark) from None
            if value in parent.key_lines:
                raise _Limit(None, None, f"duplicate key {value!r} (first at line {parent.key_lines[value]})", mark)
            parent.key_lines[value] = line
            top[1] = value
        else:
            parent[top[1]] = value
            top[1] = _NO_KEY
    parser.get_event()  # DocumentEnd
    if not parser.check_event(StreamEndEvent):
        event = parser.get_event()
        raise _Limit(None, None, "a second YAML document (a line `---`): one document only", _mark(event.start_mark))
    return root


_NO_KEY = object()


def _load_with(parser_class: type, text: str, first_line: int) -> Any:
    parser = parser_class(text)
    gc_was_on = gc.isenabled()
    gc.disable()  # tens of thousands of new containers would trigger full collections over and over
    try:
        return _build(parser, first_line)
    finally:
        if gc_was_on:
            gc.enable()
        if hasattr(parser, "dispose"):
            parser.dispose()


def parse_yaml(text: str, where: str, first_line: int = 1, note: str = "", error: type[SocklabError] = InputError) -> Any:
    """``text`` as YAML (its first line is line ``first_line`` of ``where``), with the checks above."""
    try:
        try:
            return _load_with(_PARSERS[0], text, first_line)
        except yaml.YAMLError as fast:
            if isinstance(fast, _Limit) or len(_PARSERS) == 1:
                raise
            # libyaml's messages are terser ("did not find expected ','"); PyYAML says what it got.
            _load_with(_PARSERS[-1], text, first_line)
            raise fast from None
    except _Limit as exc:
        mark_line = exc.problem_mark.line if exc.problem_mark is not None else 0  # every _Limit has its mark
        raise error(f"{where}:{mark_line + first_line}{note}: {exc.problem}") from None
    except yaml.reader.ReaderError as exc:  # control characters and the like
        line = text[:exc.position].count("\n") + first_line
        raise error(f"{where}:{line}{note}: malformed YAML: character #x{int(exc.character) if not isinstance(exc.character, str) else ord(exc.character):02x} is not allowed") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + first_line if mark else first_line
        problem = exc.problem or exc.context or "malformed"
        raise error(f"{where}:{line}{note}: malformed YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise error(f"{where}{note}: malformed YAML: {str(exc).splitlines()[0]}") from None


def plain(value: Any) -> Any:
    """``value`` with plain dicts and lists instead of ``YamlMap``/``YamlList`` (for data handed on)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


# -- shape checks ----------------------------------------------------------------------------------------


def did_you_mean(word: Any, choices: Iterable[str]) -> str:
    """``; did you mean 'x'?`` for the closest choice, or ``; known: a, b`` when none is close."""
    choices = list(choices)
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(choices) or 'none'}"


def check_keys(mapping: Mapping, allowed: Iterable[str], where: str, what: str = "key",
               error: type[SocklabError] = InputError, add_line: bool = True) -> None:
    """Every key of ``mapping`` is in ``allowed``; the first that is not is named at its line
    (``add_line=False`` when ``where`` already ends in one)."""
    allowed = list(allowed)
    for key in mapping:
        if key not in allowed:
            line = mapping.line_of(key) if isinstance(mapping, YamlMap) and add_line else 0
            at = f"{where}:{line}" if line else where
            raise error(f"{at}: unknown {what} {key!r}{did_you_mean(key, allowed)}")


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
               dict: "a mapping", type(None): "nothing"}


def describe_type(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    for kind in (dict, list, str, int, float):
        if isinstance(value, kind):
            return _TYPE_NAMES[kind]
    return type(value).__name__


def expect_type(value: Any, kinds: type | tuple[type, ...], where: str, line: int, field: str,
                error: type[SocklabError] = InputError) -> Any:
    """``value`` if it is one of ``kinds`` (a bool is never an int here), else ``error`` at ``where:line``."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        wanted = " or ".join(_TYPE_NAMES.get(kind, kind.__name__) for kind in kinds)
        shown = repr(plain(value)) if not isinstance(value, (dict, list)) else describe_type(value)
        raise error(f"{where}:{line}: `{field}:` must be {wanted}, not {shown}")
    return value


def check_path(path: Path, what: str, where: str, error: type[SocklabError] = InputError) -> Path:
    """``path`` is a readable file: "is a directory", "does not exist" or "cannot be read" otherwise."""
    if path.is_dir():
        raise error(f"{where}: {what} {path.name} is a directory, not a file")
    if not path.exists():
        raise error(f"{where}: {what} {path.name} does not exist")
    if not os.access(path, os.R_OK):
        raise error(f"{where}: {what} {path} cannot be read (permission denied, running as uid {os.geteuid()})")
    return path
