"""Benchmarks behind tools/bench.py: each module measures one thing and prints its table."""
