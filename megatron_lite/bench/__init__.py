"""Benchmarks behind tools/bench.py, one measurement per module (data, train, startup, speed, conversion); the tool
parses arguments and prints their rows."""
