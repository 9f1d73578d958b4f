"""Journal benchmark: append latency and throughput per backend and writer count.

Every FUSE mutation waits for one append, so append latency is the floor of
metadata latency and records/s with many writers is the ceiling of metadata
throughput. The second number depends on group commit: 64 writers should
share durable writes (one fsync, one produce request) instead of queueing
for 64 of them. The benchmark also measures how soon a reader in another
process (another region on the machine) sees a record, the lag that
read-your-writes across regions starts from.

Run `python -m bench.bench_journal` (add `--json` for machine-readable
output). It starts its own Kafka broker with the test harness, or uses
`--kafka kafka://host:port`; the SQLite file lives in a temporary directory
unless `--dir` names one (put it on the disk you care about: fsync cost is
the whole story there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class AppendResult:
    """One run: `writers` threads appending for `seconds`."""

    backend: str
    writers: int
    appends: int
    seconds: float
    records_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True, slots=True)
class TailResult:
    """How long after `append` returned a reader in another process had the record."""

    backend: str
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def percentile(sorted_values: list[float], q: float) -> float:
    """Return the `q` quantile (0..1) of sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def bench_appends(
    url: str, backend: str, writers: int, seconds: float, payload_size: int
) -> AppendResult:
    """Append from `writers` threads for `seconds`; every append is timed on its own."""
    from tidefs.journal.log import open_log

    volume = f"bench{uuid.uuid4().hex[:10]}"
    with open_log(url, volume) as lg:
        for _ in range(20):  # connections, producer id, first pages: not what we measure
            lg.append(os.urandom(payload_size))
        stop = threading.Event()
        gate = threading.Barrier(writers + 1)
        latencies: list[list[float]] = [[] for _ in range(writers)]

        def write(slot: int) -> None:
            payload = os.urandom(payload_size)
            mine = latencies[slot]
            gate.wait()
            while not stop.is_set():
                began = time.perf_counter()
                lg.append(payload)
                mine.append(time.perf_counter() - began)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for t in threads:
            t.start()
        gate.wait()
        began = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - began
    every = sorted(x for per in latencies for x in per)
    return AppendResult(
        backend=backend,
        writers=writers,
        appends=len(every),
        seconds=round(elapsed, 3),
        records_per_s=round(len(every) / elapsed, 1),
        p50_ms=round(percentile(every, 0.50) * 1e3, 3),
        p99_ms=round(percentile(every, 0.99) * 1e3, 3),
        max_ms=round(every[-1] * 1e3, 3) if every else float("nan"),
    )


_FOLLOW = """
import sys, time
from tidefs.journal.log import open_log
with open_log(sys.argv[1], sys.argv[2]) as lg:
    position = lg.head()
    print("ready", flush=True)
    for _ in range(int(sys.argv[3])):
        records = lg.read(position, max_records=1, timeout=30)
        seen = time.time_ns()
        if not records:
            break
        print(records[0].offset, seen, flush=True)
        position = records[0].offset + 1
"""


def bench_tail(url: str, backend: str, samples: int) -> TailResult:
    """Append one record at a time while another process follows the tail."""
    from tidefs.journal.log import open_log

    volume = f"tail{uuid.uuid4().hex[:10]}"
    with open_log(url, volume) as lg:
        lg.append(b"warm-up")
        child = subprocess.Popen(
            [sys.executable, "-c", _FOLLOW, url, volume, str(samples)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        try:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("tail follower did not start")
            returned: dict[int, int] = {}
            for n in range(samples):
                offset = lg.append(f"tail-{n}".encode())
                returned[offset] = time.time_ns()
                time.sleep(0.02)  # let the follower park on the tail again
            out, _ = child.communicate(timeout=60)
        finally:
            child.kill()
            child.wait()
    lags = sorted(
        max(0, int(seen) - returned[int(offset)]) / 1e6
        for offset, seen in (line.split() for line in out.splitlines())
        if int(offset) in returned
    )
    return TailResult(
        backend=backend,
        samples=len(lags),
        p50_ms=round(percentile(lags, 0.50), 3),
        p99_ms=round(percentile(lags, 0.99), 3),
        max_ms=round(lags[-1], 3) if lags else float("nan"),
    )


@contextlib.contextmanager
def kafka_url(given: str | None) -> Iterator[str]:
    """Yield the URL of a broker: the given one, or one started from the harness."""
    if given:
        yield given
        return
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # run as a script: make `tests` importable
    from tests.harness.kafka import KafkaBroker, locate_kafka

    libs, java = locate_kafka()
    with tempfile.TemporaryDirectory(prefix="tidefs-bench-kafka-") as workdir:
        broker = KafkaBroker(libs, Path(workdir), java=java)
        broker.start()
        try:
            yield broker.url
        finally:
            broker.stop()


def run(args: argparse.Namespace) -> dict[str, object]:
    appends: list[AppendResult] = []
    tails: list[TailResult] = []
    for backend in args.backends:
        if backend == "sqlite":
            workdir = args.dir or tempfile.mkdtemp(prefix="tidefs-bench-")
            context: contextlib.AbstractContextManager[str] = contextlib.nullcontext(
                f"sqlite://{Path(workdir).resolve() / f'bench-{uuid.uuid4().hex[:8]}.db'}"
            )
        else:
            context = kafka_url(args.kafka)
        with context as url:
            for writers in args.writers:
                result = bench_appends(url, backend, writers, args.seconds, args.payload)
                appends.append(result)
                progress(f"{backend:<7} {writers:>3} writers: {result.records_per_s:>9.0f} rec/s")
            if args.tail:
                tails.append(bench_tail(url, backend, args.tail))
    speedup: dict[str, float] = {}
    for backend in args.backends:
        by_writers = {r.writers: r for r in appends if r.backend == backend}
        low, high = min(by_writers), max(by_writers)
        if low != high and by_writers[low].records_per_s > 0:
            speedup[backend] = round(
                by_writers[high].records_per_s / by_writers[low].records_per_s, 1
            )
    return {
        "payload_bytes": args.payload,
        "seconds_per_run": args.seconds,
        "cpus": os.cpu_count(),
        "appends": [asdict(r) for r in appends],
        "tail_other_process": [asdict(t) for t in tails],
        "group_commit_speedup": speedup,
    }


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def print_table(report: dict[str, object]) -> None:
    rows = report["appends"]
    assert isinstance(rows, list)
    print(
        f"journal appends, {report['payload_bytes']}-byte payloads, {report['seconds_per_run']}s per run"
    )
    print(
        f"{'backend':<8}{'writers':>8}{'records/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}"
    )
    for r in rows:
        print(
            f"{r['backend']:<8}{r['writers']:>8}{r['records_per_s']:>12.0f}"
            f"{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['max_ms']:>10.2f}"
        )
    speedup = report["group_commit_speedup"]
    assert isinstance(speedup, dict)
    for backend, factor in speedup.items():
        print(
            f"group commit: {backend} with the most writers does {factor}x the records/s of the fewest"
        )
    tails = report["tail_other_process"]
    assert isinstance(tails, list)
    if tails:
        print("tail latency, append returned -> reader in another process has the record:")
        for t in tails:
            print(
                f"{t['backend']:<8}{t['samples']:>5} samples  p50 {t['p50_ms']:.2f} ms  "
                f"p99 {t['p99_ms']:.2f} ms  max {t['max_ms']:.2f} ms"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--backends",
        type=lambda s: [b.strip() for b in s.split(",") if b.strip()],
        default=["sqlite", "kafka"],
        help="comma-separated: sqlite,kafka",
    )
    parser.add_argument(
        "--writers",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[1, 8, 64],
        help="comma-separated writer thread counts (default 1,8,64)",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    parser.add_argument("--payload", type=int, default=256, help="payload bytes per record")
    parser.add_argument("--tail", type=int, default=100, help="tail latency samples (0: skip)")
    parser.add_argument("--dir", help="directory for the SQLite file (default: a temp dir)")
    parser.add_argument(
        "--kafka", help="use this broker (kafka://host:port) instead of starting one"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    unknown = set(args.backends) - {"sqlite", "kafka"}
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
