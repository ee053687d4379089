"""Measurements: `invoke bench`, the soak test, and the zerocopy throughput bench."""
