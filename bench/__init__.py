"""Benchmarks: each measures pdserve against a baseline run in the same invocation."""
