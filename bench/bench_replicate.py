"""Replication benchmark: how soon a block written at A is local at B, and what a fallback read costs.

Two figures, each against a reference measured in the same run:

- Replication latency. A 4 MiB block is written at region A the way a mount
  writes it (uploaded to A's store, then committed through A's replica); the
  clock starts when the commit is acknowledged and stops when B's replicator
  has stored the block in B's store. That includes B folding the record, the
  replicator noticing it, and the copy. The reference is a direct copy of the
  same 4 MiB between the two stores (get from A, put to B): the floor that any
  replicator pays. The ratio says what following the log costs on top.

- Cold read throughput at the mirror. Blocks written at A are read at B with
  B's replicator off, so every read falls back to A through `BlockFetcher`
  (local miss, read from the home region, checksum), compared with reading
  the same blocks from A's store directly. Measured without and with the
  write-behind that stores each fallback-read block at B (it competes with
  the reads for CPU and disk on one machine), one block at a time and with 8
  readers in parallel; best of `--repeat` interleaved runs, with B's copies
  deleted between runs so that every run is cold.

Stores are two S3 endpoints (moto servers in two processes, loopback) by
default, or two directories with `--store file`. The log is SQLite in a
temporary directory unless `--journal URL` names one. Run
`python -m bench replicate` or `python -m bench.bench_replicate [--json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

MIB = 1 << 20
BLOCK = 4 * MIB


@contextlib.contextmanager
def store_urls(kind: str, tmp: Path) -> Iterator[dict[str, str]]:
    """Yield the store URLs of regions a and b: two S3 endpoints, or two directories."""
    if kind == "file":
        yield {r: (tmp / f"store-{r}").as_uri() for r in "ab"}
        return
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # run as a script: make `tests` importable
    from tests.harness.s3 import FAKE_AWS_ENV, S3Server

    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(FAKE_AWS_ENV)
    servers = [S3Server(), S3Server()]
    try:
        for server in servers:
            server.start()
        yield {r: s.store_url(s.create_bucket()) for r, s in zip("ab", servers, strict=True)}
    finally:
        for server in servers:
            server.close()
        for k in FAKE_AWS_ENV:
            os.environ.pop(k, None)
        os.environ.update(saved)


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1e3, 2),
        "p90_ms": round(p90 * 1e3, 2),
        "min_ms": round(ordered[0] * 1e3, 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tidefs.journal.commands import (
        ROOT_INODE,
        CommitSlice,
        CreateVolume,
        Mknod,
        Region,
        SliceRef,
    )
    from tidefs.journal.log import open_log
    from tidefs.replica.blocks import block_key, new_slice_id
    from tidefs.replica.fetch import BlockFetcher
    from tidefs.replica.replica import Replica
    from tidefs.replica.replicator import Replicator
    from tidefs.replica.state import State
    from tidefs.replica.store import open_store

    with tempfile.TemporaryDirectory(prefix="tidefs-bench-") as tmpdir:
        tmp = Path(tmpdir)
        journal = args.journal or f"sqlite://{tmp / 'log.db'}"
        volume = f"bench{uuid.uuid4().hex[:8]}"
        with store_urls(args.store, tmp) as urls, contextlib.ExitStack() as stack:
            stores = {r: open_store(u) for r, u in urls.items()}
            for store in stores.values():
                stack.callback(store.close)
            replicas: dict[str, Replica] = {}
            for r in "ab":
                state = State.open(tmp / f"state-{r}")
                stack.callback(state.close)
                log_ = open_log(journal, volume)
                stack.callback(log_.close)
                replicas[r] = Replica(log_, state, r).start()
                stack.callback(replicas[r].stop)
            a, b = replicas["a"], replicas["b"]
            regions = tuple(Region(r, u) for r, u in urls.items())
            assert a.submit(CreateVolume(volume, regions, "a", block_size=BLOCK)).ok
            ino = a.submit(Mknod(ROOT_INODE, b"data", 0o100644, 0, 0)).inode
            chunk = iter(range(1 << 20))

            def write_block(payload: bytes) -> SliceRef:
                ref = SliceRef(new_slice_id(), 0, len(payload), BLOCK, "a")
                stores["a"].put_block(block_key(ref.slice_id, 0), payload)
                assert a.submit(CommitSlice(ino, next(chunk), ref)).ok
                return ref

            rlog = open_log(journal, volume)
            stack.callback(rlog.close)
            b.barrier(timeout=30)
            replicator = Replicator(rlog, "b", stores, tmp / "progress-b", state=b.state)
            stack.callback(replicator.close)
            replicator.start()

            # -- replication latency vs a direct copy ------------------------------------
            latency: list[float] = []
            direct: list[float] = []
            for _ in range(args.samples):
                payload = os.urandom(BLOCK)
                before = replicator.stats().blocks_copied
                write_block(payload)
                start = time.perf_counter()
                deadline = start + 60
                while replicator.stats().blocks_copied == before:
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"block not replicated in 60 s: {replicator.failures()}")
                    time.sleep(0.0005)
                latency.append(time.perf_counter() - start)

                key = block_key(new_slice_id(), 0)
                stores["a"].put_block(key, payload)
                start = time.perf_counter()
                stores["b"].put_block(key, stores["a"].get_block(key))
                direct.append(time.perf_counter() - start)
            rep = {"samples": args.samples, **_ms(latency)}
            ref_copy = _ms(direct)
            replication = {
                "replicated": rep,
                "direct_copy": ref_copy,
                "ratio_p50": round(rep["p50_ms"] / ref_copy["p50_ms"], 2),
            }

            # -- cold reads at the mirror: fallback vs the primary's store -----------------
            replicator.pause()
            refs = [write_block(os.urandom(BLOCK)) for _ in range(args.blocks)]
            b.barrier(timeout=30)
            fetchers = {wb: BlockFetcher("b", stores, write_back=wb) for wb in (False, True)}
            for f in fetchers.values():
                stack.callback(f.close)
            megabytes = args.blocks * BLOCK / MIB

            def direct_read(ref: SliceRef) -> int:
                return len(stores["a"].get_block(block_key(ref.slice_id, 0)))

            def rate(fn: Any, threads: int) -> float:
                start = time.perf_counter()
                if threads == 1:
                    for ref in refs:
                        fn(ref)
                else:
                    with ThreadPoolExecutor(threads) as pool:
                        list(pool.map(fn, refs))
                return megabytes / (time.perf_counter() - start)

            cold: dict[str, Any] = {}
            for wb, fetcher in fetchers.items():

                def fallback_read(ref: SliceRef, fetcher: BlockFetcher = fetcher) -> int:
                    return len(fetcher.get(ref, 0))

                def make_cold(fetcher: BlockFetcher = fetcher) -> None:
                    fetcher.flush_write_backs(60)
                    stores["b"].delete_many(block_key(ref.slice_id, 0) for ref in refs)

                mode = "write_back" if wb else "no_write_back"
                for name, threads in (("sequential", 1), ("parallel_8", 8)):
                    # Best of a few interleaved runs: the machine's other load is noise.
                    primary = fallback = 0.0
                    for run_no in range(args.repeat):
                        if run_no % 2:
                            fallback = max(fallback, rate(fallback_read, threads))
                            primary = max(primary, rate(direct_read, threads))
                        else:
                            primary = max(primary, rate(direct_read, threads))
                            fallback = max(fallback, rate(fallback_read, threads))
                        make_cold()
                    cold[f"{mode}_{name}"] = {
                        "fallback_MiBps": round(fallback, 1),
                        "primary_direct_MiBps": round(primary, 1),
                        "ratio": round(fallback / primary, 2),
                    }
                cold[f"{mode}_fallback_reads"] = fetcher.stats().fallback_reads
            return {
                "store": args.store,
                "journal": journal.split(":", 1)[0],
                "block_bytes": BLOCK,
                "replication_latency": replication,
                "cold_read": cold,
            }


def print_report(report: dict[str, Any]) -> None:
    rl = report["replication_latency"]
    print(f"stores: {report['store']}, journal: {report['journal']}, block {BLOCK // MIB} MiB")
    print(
        f"written at A -> local at B: p50 {rl['replicated']['p50_ms']} ms, "
        f"p90 {rl['replicated']['p90_ms']} ms ({rl['replicated']['samples']} samples)"
    )
    print(
        f"direct copy A -> B:         p50 {rl['direct_copy']['p50_ms']} ms   "
        f"ratio {rl['ratio_p50']}x"
    )
    for mode in ("no_write_back", "write_back"):
        for name in ("sequential", "parallel_8"):
            c = report["cold_read"][f"{mode}_{name}"]
            print(
                f"cold read at B, {mode.replace('_', '-')}, {name}: fallback "
                f"{c['fallback_MiBps']} MiB/s vs A's store directly "
                f"{c['primary_direct_MiBps']} MiB/s: ratio {c['ratio']}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--store", choices=["s3", "file"], default="s3")
    parser.add_argument("--journal", help="journal URL (default: SQLite in a temp dir)")
    parser.add_argument("--samples", type=int, default=10, help="replication latency samples")
    parser.add_argument("--blocks", type=int, default=16, help="4 MiB blocks per cold-read run")
    parser.add_argument("--repeat", type=int, default=3, help="cold-read runs (best is kept)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
