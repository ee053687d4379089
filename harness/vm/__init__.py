"""One QEMU process: its argv, QMP, its saved state (vmstate), its serial console, and which processes are ours."""
