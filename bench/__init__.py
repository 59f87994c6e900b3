"""Benchmarks: ``python -m bench`` (see bench/README.md)."""
