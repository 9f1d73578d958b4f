"""Benchmarks of tidefs: `python -m bench.bench_journal`, ...; each prints a table or `--json`."""
