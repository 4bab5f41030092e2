"""Measuring a deployment: the machine a figure was taken on, and how benchmark results are
printed (a table, then one JSON line), shared by ``scripts/bench_*.py``."""
