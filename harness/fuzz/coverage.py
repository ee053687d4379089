"""Rule coverage: which of the model's rules and cited kernel functions a run exercised.

The universe is read from the model's source with ``ast``: every ``fail("EXXX", ..., "kernel_fn")``
and every ``Result(op, ret, None | "EXXX", rule, "kernel_fn")`` whose errno and function are
literals is one rule, named ``kernel_fn:errno`` (``ok`` for success). A run's results name the
rule that produced them the same way, so what was reached and what was not is a set difference.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent.parent / "model"
NOT_KERNEL = {"model"}  # the model's own argument checks cite no kernel function


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


@lru_cache(maxsize=1)
def model_rules() -> frozenset[str]:
    """Every rule the model source states with a literal errno and kernel function."""
    rules = set()
    for path in sorted(MODEL_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            args = node.args
            if node.func.id == "fail" and len(args) >= 3:
                errno, fn = _literal(args[0]), _literal(args[2])
            elif node.func.id == "Result" and len(args) >= 5:
                fn = _literal(args[4])
                errno = "ok" if isinstance(args[2], ast.Constant) and args[2].value is None else _literal(args[2])
            else:
                continue
            if errno and fn and fn not in NOT_KERNEL:
                rules.add(rule_id(fn, errno))
    return frozenset(rules)


def rule_id(kernel_fn: str, errno: str | None) -> str:
    return f"{kernel_fn}:{errno or 'ok'}"


@dataclass(frozen=True)
class Coverage:
    """What a run reached: rules (``fn:errno``) and kernel functions, against the model's whole set."""

    reached_rules: frozenset[str]
    all_rules: frozenset[str]

    @property
    def functions(self) -> frozenset[str]:
        return frozenset(rule.rsplit(":", 1)[0] for rule in self.all_rules)

    @property
    def reached_functions(self) -> frozenset[str]:
        return frozenset(rule.rsplit(":", 1)[0] for rule in self.reached_rules & self.all_rules)

    @property
    def never_reached(self) -> list[str]:
        return sorted(self.all_rules - self.reached_rules)

    @property
    def functions_never_reached(self) -> list[str]:
        return sorted(self.functions - self.reached_functions)

    def summary(self) -> str:
        rules, functions = self.all_rules, self.functions
        hit = len(self.reached_rules & rules)
        return (f"model rules exercised: {hit} of {len(rules)} ({100 * hit / max(1, len(rules)):.0f}%); "
                f"cited kernel functions exercised: {len(self.reached_functions)} of {len(functions)}")


def coverage(reached: set[str]) -> Coverage:
    return Coverage(frozenset(reached), model_rules())
