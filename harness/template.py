"""Templates socklab renders (scenario bodies, expectation templates): jinja2 in a sandbox, with a budget.

- ``sandbox``: the one environment, sandboxed, strict about undefined names.
- ``render_budgeted``: at most ``MAX_TEMPLATE_CHARS`` of output and
  ``TEMPLATE_SECONDS`` of wall-clock time (a timer signal when on the main
  thread, and a check on every call, attribute access and output chunk either
  way); big powers and products are refused before they are computed; runaway
  recursion is an error, not a traceback.
- ``template_budget``: the same time budget around other template work.

Apart from ``harness.load`` (which parses YAML) so that commands which render
nothing, ``lab.up`` among them, never import jinja2.
"""

from __future__ import annotations

import contextlib
import functools
import re
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.sandbox

MAX_TEMPLATE_CHARS = 16 << 20   # rendered output of one template
TEMPLATE_SECONDS = 5.0          # wall clock for one render; a 20,000-step body takes 0.1 s
MAX_TEMPLATE_INT_BITS = 256     # products and powers in a template stay below 2**256
MAX_TEMPLATE_SEQUENCE = 1 << 20  # "x" * n and [0] * n in a template


class TemplateLimit(Exception):
    """A template went past its budget (time, output, number size); the message says which."""


class _Budget(threading.local):
    deadline: float | None = None
    seconds: float = TEMPLATE_SECONDS


_budget = _Budget()


def _check_time() -> None:
    if _budget.deadline is not None and time.monotonic() > _budget.deadline:
        raise TemplateLimit(f"took longer than {_budget.seconds:g} s (a loop too big?)")


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


def _check_size(value: Any) -> Any:
    """``value``, unless it is a string or list too long to be a step's worth of data."""
    size = _size(value)
    if size is not None and size > MAX_TEMPLATE_SEQUENCE:
        raise TemplateLimit(f"a value of {size} characters or items is too long (at most {MAX_TEMPLATE_SEQUENCE})")
    return value


def _check_counts(args: tuple, kwargs: dict) -> None:
    """A width or count argument past ``MAX_TEMPLATE_SEQUENCE`` (``center(10**9)``) is refused before it allocates."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TEMPLATE_SEQUENCE:
            raise TemplateLimit(f"a width or count of {value} is too large (at most {MAX_TEMPLATE_SEQUENCE})")


_FORMAT_WIDTH = re.compile(r"\{[^{}]*:[^{}]*(\d{7,}|\{)")


def _budgeted_filter(function):
    @functools.wraps(function)  # keeps jinja2's pass_context/pass_environment marks
    def budgeted(*args, **kwargs):
        _check_time()
        _check_counts(args[1:], kwargs)
        return _check_size(function(*args, **kwargs))

    return budgeted


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    """``a ~ b`` through ``environment.concat``, so a template that doubles a string in a loop is stopped."""

    def visit_Concat(self, node, frame):
        self.write("environment.concat((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")


class Sandbox(jinja2.sandbox.SandboxedEnvironment):
    """The sandbox with a budget: every call, filter, attribute and item access checks the clock; ``*``,
    ``**``, ``+``, ``%`` and ``~`` refuse results past ``MAX_TEMPLATE_INT_BITS`` bits or
    ``MAX_TEMPLATE_SEQUENCE`` characters or items (and calls and filters check what they return)."""

    intercepted_binops = frozenset({"*", "**", "<<", "+", "%"})
    code_generator_class = _CodeGenerator

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: _budgeted_filter(function) for name, function in self.filters.items()}

    def concat(self, values: Iterable[Any]) -> str:
        _check_time()
        parts = [str(value) for value in values]
        if sum(map(len, parts)) > MAX_TEMPLATE_SEQUENCE:
            raise TemplateLimit(f"a string of more than {MAX_TEMPLATE_SEQUENCE} characters")
        return "".join(parts)

    def call_binop(self, context, operator, left, right):
        _check_time()
        if operator == "%" and isinstance(left, str) and re.search(r"%[-+ #0]*(\*|\d{7,})", left):
            raise TemplateLimit("a %-format with a huge or computed width")
        if operator == "<<" and isinstance(right, int) and right > MAX_TEMPLATE_INT_BITS:
            raise TemplateLimit(f"{left} << {right} is too large a number")
        numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        if operator == "**" and numbers and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > MAX_TEMPLATE_INT_BITS:
                raise TemplateLimit(f"{left} ** {right} is too large a number")
        elif operator == "*" and numbers:
            if abs(left).bit_length() + abs(right).bit_length() > MAX_TEMPLATE_INT_BITS:
                raise TemplateLimit(f"{left} * {right} is too large a number")
        elif operator == "*":
            for seq, count in ((left, right), (right, left)):
                size = _size(seq)
                if size is not None and isinstance(count, int) and size * count > MAX_TEMPLATE_SEQUENCE:
                    raise TemplateLimit(f"a sequence of {size} repeated {count} times is too long")
        elif operator == "+" and (left_size := _size(left)) is not None and (right_size := _size(right)) is not None:
            if left_size + right_size > MAX_TEMPLATE_SEQUENCE:
                raise TemplateLimit(f"a value of more than {MAX_TEMPLATE_SEQUENCE} characters or items")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
        _check_time()
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        if isinstance(getattr(method, "__self__", None), (str, list, bytes)):
            _check_counts(args, kwargs)
            if getattr(method, "__name__", "") in ("format", "format_map") and _FORMAT_WIDTH.search(
                    method.__self__):
                raise TemplateLimit("a format with a huge or computed width")
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_time()
        return super().getitem(obj, argument)


@functools.cache
def sandbox() -> Sandbox:
    """The one template environment: sandboxed, budgeted, strict about undefined names, no autoescape.

    Made once per process; nothing changes it after ``__init__``, and jinja2 renders from many threads.
    """
    return Sandbox(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


# Compiling is most of what a template or an expression costs: a lab check compiled about 150, most
# of them the same texts again (every scenario's params, every expectation per run), 0.6 s of a
# 4 s check of lab 07 on the host. A syntax error is not cached: it is raised again each time.
@functools.lru_cache(maxsize=256)
def compiled(text: str) -> jinja2.Template:
    """``sandbox().from_string(text)``, compiled once per text."""
    return sandbox().from_string(text)


@functools.lru_cache(maxsize=2048)
def expression(source: str, undefined_to_none: bool = True) -> jinja2.environment.TemplateExpression:
    """``sandbox().compile_expression(source, ...)``, compiled once per source."""
    return sandbox().compile_expression(source, undefined_to_none=undefined_to_none)


@contextlib.contextmanager
def template_budget(seconds: float | None = None) -> Iterator[None]:
    """Bound what runs inside (``TEMPLATE_SECONDS`` by default): the checks above, and on the main thread a
    timer signal that interrupts even a loop that makes no call (the previous SIGALRM handler and timer are
    restored after). Nested budgets keep the outer deadline."""
    seconds = TEMPLATE_SECONDS if seconds is None else seconds
    if _budget.deadline is not None:
        yield
        return
    _budget.deadline = time.monotonic() + seconds
    _budget.seconds = seconds
    use_alarm = (threading.current_thread() is threading.main_thread()
                 and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))
    previous = None
    if use_alarm:
        def on_alarm(signum, frame):
            raise TemplateLimit(f"took longer than {seconds:g} s (a loop too big?)")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        _budget.deadline = None


def render_budgeted(template: jinja2.Template, variables: Mapping[str, Any]) -> str:
    """Render ``template`` within the output and time budget (raises TemplateLimit past either)."""
    chunks, size = [], 0
    with template_budget():
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_TEMPLATE_CHARS:
                raise TemplateLimit(f"output is larger than {MAX_TEMPLATE_CHARS >> 20} MiB (a loop too big?)")
            chunks.append(chunk)
            _check_time()
    return "".join(chunks)

