"""`python -m chaos run [--scenario NAME ...] [--seconds N] [--json] [--list]`.

Prints one row per scenario (ops acknowledged, ops lost, reads wrong,
convergence time, result) and exits 1 when any invariant failed, 0 otherwise.
Skipped scenarios (e.g. no FUSE, no Kafka jars) are shown with the reason and
do not fail the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from chaos.harness import Services
from chaos.scenarios import SCENARIOS, Result, run_scenario


def table(results: list[Result]) -> str:
    """Format results as the run's table."""
    head = ("scenario", "ops acked", "ops lost", "reads", "reads wrong", "convergence", "result")
    rows = [head]
    for r in results:
        v = r.verdict
        conv = "-" if r.convergence_s is None else f"{r.convergence_s:.1f} s"
        result = "skip" if r.skipped else ("ok" if r.ok else "FAIL")
        rows.append(
            (
                r.scenario,
                str(v.acknowledged),
                str(v.lost),
                str(v.reads),
                str(v.reads_wrong),
                conv,
                result,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    for r in results:
        if r.skipped:
            lines.append(f"{r.scenario}: skipped: {r.skipped}")
        for p in r.verdict.problems:
            lines.append(f"{r.scenario}: {p}")
        if not r.ok and not r.skipped:
            lines.append(f"{r.scenario}: replay with --seed {r.seed}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run scenarios and check their invariants")
    run.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default: all"
    )
    run.add_argument("--seconds", type=float, default=30.0, help="workload time per scenario")
    run.add_argument("--seed", type=int, default=None, help="the workload's random seed")
    run.add_argument("--json", action="store_true", help="one JSON object per scenario")
    run.add_argument("--list", action="store_true", help="list the scenarios and exit")
    run.add_argument("--workdir", type=Path, default=None, help="keep files here (default: temp)")
    run.add_argument(
        "--history", type=Path, default=None, metavar="DIR", help="write each history as JSON lines"
    )
    args = p.parse_args(argv)
    if args.list:
        for name, s in SCENARIOS.items():
            print(f"{name:24} {s.journal:7} {s.summary}")
        return 0
    names = args.scenario or list(SCENARIOS)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tidefs-chaos-") as tmp:
        work = args.workdir or Path(tmp)
        with Services(work / "services") as services:
            for name in names:
                r = run_scenario(
                    SCENARIOS[name],
                    services,
                    work,
                    seconds=args.seconds,
                    seed=args.seed,
                    history_dir=args.history,
                )
                results.append(r)
                if args.json:
                    print(json.dumps(r.as_dict()), flush=True)
                else:
                    print(table([r]).splitlines()[1], flush=True)
    if not args.json:
        print(table(results))
    return 0 if all(r.ok or r.skipped for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
