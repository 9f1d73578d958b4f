"""Run tidefs benchmarks: `python -m bench [NAME ...] [-- ARGS]`.

With no names, every `bench/bench_*.py` runs in turn. Each benchmark starts
the services it needs itself, reports absolute figures and ratios against a
reference measured in the same run, and takes `--json`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def available() -> list[str]:
    """Names of the benchmarks in this folder (`bench_fold` -> `fold`)."""
    here = Path(__file__).parent
    return sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))


def main(argv: list[str]) -> int:
    cut = argv.index("--") if "--" in argv else len(argv)
    names, rest = argv[:cut], argv[cut + 1 :]
    if any(n in ("-h", "--help") for n in names):
        print(__doc__)
        print("benchmarks:", " ".join(available()))
        return 0
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"bench: unknown benchmark(s) {unknown}; available: {available()}", file=sys.stderr)
        return 2
    code = 0
    for name in names or available():
        print(f"== bench {name}", flush=True)
        module = importlib.import_module(f"bench.bench_{name}")
        code = max(code, int(module.main(list(rest)) or 0))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
