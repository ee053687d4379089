"""socklab: QEMU-backed labs for the Linux socket layer."""

import sys as _sys

__version__ = "0.1.0"

# invoke turns bytecode writing off before it loads tasks.py (so that no tasks.pyc lands beside it),
# and every harness module a command imported after that was compiled from source again, by every
# command, since nothing else ever wrote their .pyc: `lab.check 01` spent 89 ms compiling, 31 ms
# with the cache (the rest is its templates). The interpreter's own setting (-B,
# PYTHONDONTWRITEBYTECODE) holds for the package instead.
_sys.dont_write_bytecode = bool(_sys.flags.dont_write_bytecode)
