"""Benchmarks of the gateway against the limits of its own stack: `make bench`."""
