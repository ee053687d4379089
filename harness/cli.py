"""The ``socklab`` command of an installed socklab: invoke's Program with socklab's own tasks.

A checkout runs ``invoke TASK`` (invoke finds tasks.py beside it); an install from a wheel has
no tasks.py to find, so ``socklab TASK`` runs the same tasks (``socklab --list``,
``socklab lab.model --file x.yaml``). Recipes and labs are then found as harness/paths.py says.
"""

from __future__ import annotations

import sys
from importlib import metadata


def main(argv: list[str] | None = None) -> None:
    from invoke import Program

    import tasks  # socklab's tasks.py, installed beside the package (pyproject: py-modules)

    try:
        version = metadata.version("socklab")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout that is not installed
        version = "unknown"
    Program(namespace=tasks.ns, name="socklab", binary="socklab", version=version).run(
        argv if argv is None else ["socklab", *argv])


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
