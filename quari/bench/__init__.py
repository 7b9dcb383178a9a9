"""Benchmarks (run as modules, e.g. ``python -m quari.bench.topk_speed``); not tests."""
