"""socklab: QEMU-backed labs for the Linux socket layer."""

__version__ = "0.1.0"
