"""A lab: its topology, its state on disk and its lock, booting and stopping its VMs, and diagnosing faults."""
