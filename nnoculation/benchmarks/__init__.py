"""Benchmarks: scripts whose output is every figure in ``docs/results/``."""
