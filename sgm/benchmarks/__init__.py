"""Throughput and FLOP benchmarks, runnable as `python -m sgm.benchmarks.<name>`."""
