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

- Metadata lag. A steady load of small-file creates is submitted at region
  A (`--rate` per second for `--seconds`); for each record, the time from
  its append (the writer's timestamp) to the moment B's fold has applied
  it. Reported as p50/p99; the target is p99 <= one-way delay + 20 ms.
  Also split in two: the writer's timestamp to the append acknowledged at
  A (no link crossed), and that acknowledgement to the fold at B (the link,
  B's fetch and the fold). All clocks are this machine's wall clock.

Cross-region delay (`--delay-ms 0,10,30`): every figure is measured once per
one-way delay between the regions. Region B reaches region A's store and
the Kafka broker across the delayed link; A reaches them directly (the
broker and A's store live in A). The link is a userspace forwarder that
holds every byte for the delay in each direction (`DelayProxy` in
tests/harness/netns.py, run in a process of its own so that its threads do
not compete with the measured replicas for the interpreter lock): it
models latency, not bandwidth or loss. The
report also says whether this kernel would allow a network namespace with
netem (the tests' delayed link), and if not, its answer.
A delay needs the Kafka journal (a SQLite file cannot be far away) and S3
stores (a directory cannot either): with `--store file` the block figures
are measured at 0 ms only.

Stores are two S3 endpoints (moto servers in two processes, loopback) by
default, or two directories with `--store file`. The log of the block
figures is SQLite in a temporary directory unless `--journal URL` names
one; the metadata lag is measured on a Kafka broker started here
(`--lag-journal sqlite` for the 0 ms figure on SQLite instead). Run
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
def store_servers(kind: str, tmp: Path) -> Iterator[dict[str, tuple[str, int | None]]]:
    """Yield region -> (store URL, S3 port or None): two S3 endpoints, or two directories."""
    if kind == "file":
        yield {r: ((tmp / f"store-{r}").as_uri(), None) for r in "ab"}
        return
    _import_harness()
    from tests.harness.s3 import FAKE_AWS_ENV, S3Server

    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(FAKE_AWS_ENV)
    servers = [S3Server(), S3Server()]
    try:
        for server in servers:
            server.start()
        yield {
            r: (s.store_url(s.create_bucket()), s.port) for r, s in zip("ab", servers, strict=True)
        }
    finally:
        for server in servers:
            server.close()
        for k in FAKE_AWS_ENV:
            os.environ.pop(k, None)
        os.environ.update(saved)


def _import_harness() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # run as a script: make `tests` importable


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1e3, 2),
        "p90_ms": round(p90 * 1e3, 2),
        "min_ms": round(ordered[0] * 1e3, 2),
    }


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the delayed link between the regions ----------------------------------------------


class Links:
    """Delayed paths from region B to services of region A, all with one adjustable delay.

    Each `path(port)` returns a loopback port whose traffic reaches `port`
    after `delay_ms` in each direction. The method is a userspace forwarder
    (`DelayProxy`), run in a child process of its own: in this process its
    threads would compete for the interpreter lock with the replicas being
    measured, and so add their own delay to the figures. `netem` records
    whether this kernel would have allowed a network namespace with netem
    instead, and if not, its answer.
    """

    def __init__(self) -> None:
        _import_harness()
        import subprocess

        from tests.harness.netns import DelayedNamespace, NetnsUnavailable

        self.delay_ms = 0.0
        try:
            DelayedNamespace(1).create().close()
            self.netem = "available"
        except NetnsUnavailable as exc:
            self.netem = f"refused: {exc}"
        self._child = subprocess.Popen(
            [sys.executable, "-c", "import bench.bench_replicate as b; b._proxy_child()"],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, line: str) -> str:
        assert self._child.stdin is not None and self._child.stdout is not None
        self._child.stdin.write(line + "\n")
        self._child.stdin.flush()
        answer = self._child.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"the delay proxy process exited (code {self._child.poll()})")
        return answer

    def path(self, port: int, listen_port: int = 0) -> int:
        return int(self._ask(f"path {port} {listen_port}"))

    def set_delay(self, delay_ms: float) -> None:
        self.delay_ms = delay_ms
        self._ask(f"delay {delay_ms}")

    def close(self) -> None:
        if self._child.stdin is not None:
            self._child.stdin.close()  # end of input: the child closes its proxies and exits
        try:
            self._child.wait(10)
        except Exception:
            self._child.kill()
            self._child.wait()


def _proxy_child() -> None:
    """The delay proxies' process: one command a line on stdin, one answer a line on stdout."""
    _import_harness()
    from tests.harness.netns import DelayProxy

    proxies: list[Any] = []
    delay = 0.0
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["path"]:
            proxy = DelayProxy(("127.0.0.1", int(words[1])), delay, port=int(words[2]))
            proxies.append(proxy)
            print(proxy.port, flush=True)
        elif words[:1] == ["delay"]:
            delay = float(words[1])
            for proxy in proxies:
                proxy.delay_ms = delay
            print("ok", flush=True)
    for proxy in proxies:
        proxy.close()


def _via(url: str, port: int | None, new_port: int) -> str:
    """Return an S3 store URL with its endpoint's port replaced."""
    assert port is not None
    return url.replace(f"127.0.0.1:{port}", f"127.0.0.1:{new_port}")


# -- metadata lag ------------------------------------------------------------------------


def _start_replicas(
    stack: contextlib.ExitStack, tmp: Path, volume: str, journals: dict[str, str]
) -> dict[str, Any]:
    """Start one Replica per region (its own state under `tmp`), stopped by `stack`."""
    from tidefs.journal.log import open_log
    from tidefs.replica.replica import Replica
    from tidefs.replica.state import State

    replicas: dict[str, Any] = {}
    for r, journal in journals.items():
        state = State.open(tmp / f"{volume}-state-{r}")
        stack.callback(state.close)
        log_ = open_log(journal, volume)
        stack.callback(log_.close)
        replicas[r] = Replica(log_, state, r).start()
        stack.callback(replicas[r].stop)
    return replicas


def metadata_lag(
    journal_a: str, journal_b: str, tmp: Path, *, rate: float, seconds: float
) -> dict[str, Any]:
    """Append small-file creates at A at a steady rate; time each record until B applied it."""
    from tidefs.journal.commands import ROOT_INODE, CreateVolume, Mknod, Region
    from tidefs.journal.log import open_log
    from tidefs.replica.state import ApplyResult

    volume = f"lag{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        replicas = _start_replicas(stack, tmp, volume, {"a": journal_a, "b": journal_b})
        a, b = replicas["a"], replicas["b"]
        applied: list[tuple[int, int]] = []  # (offset applied at B, wall clock ns)
        acked: dict[int, int] = {}  # offset -> wall clock ns when A's append returned
        append = a.log.append

        def timed_append(payload: bytes, timestamp_ns: int | None = None) -> int:
            offset = append(payload, timestamp_ns)
            acked[offset] = time.time_ns()
            return offset

        setattr(a.log, "append", timed_append)  # noqa: B010 - an instance attribute, on purpose

        def on_apply(result: ApplyResult) -> None:
            applied.append((result.applied_offset, time.time_ns()))

        b.add_listener(on_apply)
        regions = (
            Region("a", (tmp / "unused-a").as_uri()),
            Region("b", (tmp / "unused-b").as_uri()),
        )
        assert a.submit(CreateVolume(volume, regions, "a")).ok
        b.barrier(timeout=60)
        count = max(1, int(rate * seconds))
        offsets: list[int] = []
        start = time.perf_counter()
        for i in range(count):
            pause = start + i / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            out = a.submit(Mknod(ROOT_INODE, f"f{i}".encode(), 0o100644, 0, 0))
            assert out.ok, out
            offsets.append(out.offset)
        achieved = count / (time.perf_counter() - start)
        b.barrier(timeout=60)
        deadline = time.monotonic() + 10  # listeners run just after the offset is visible
        while (not applied or applied[-1][0] < offsets[-1]) and time.monotonic() < deadline:
            time.sleep(0.01)
        with open_log(journal_a, volume) as lg:
            stamps: dict[int, int] = {}
            at = offsets[0]
            while at <= offsets[-1]:
                records = lg.read(at, 1000, timeout=5)
                if not records:
                    raise RuntimeError(f"the log ends before offset {at}")
                stamps.update((rec.offset, rec.timestamp_ns) for rec in records)
                at = records[-1].offset + 1
    lags = []
    appends = []  # the writer's timestamp -> the append acknowledged at A
    rest = []  # acknowledged at A -> applied at B: the link, the fetch and the fold
    j = 0
    for off in offsets:  # both in offset order: one merge pass
        while applied[j][0] < off:
            j += 1
        lags.append((applied[j][1] - stamps[off]) / 1e9)
        appends.append((acked[off] - stamps[off]) / 1e9)
        rest.append((applied[j][1] - acked[off]) / 1e9)
    ordered = sorted(lags)

    def p50_p99(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "p50_ms": round(statistics.median(ordered) * 1e3, 2),
            "p99_ms": round(_percentile(ordered, 0.99) * 1e3, 2),
        }

    return {
        "records": count,
        "rate_per_s": round(achieved, 1),
        **p50_p99(lags),
        "max_ms": round(ordered[-1] * 1e3, 2),
        "append_at_a": p50_p99(appends),
        "acked_to_applied_at_b": p50_p99(rest),
    }


# -- blocks: replication latency and cold reads ----------------------------------------------


def blocks(
    args: argparse.Namespace,
    urls_a: dict[str, str],
    urls_b: dict[str, str],
    journal: str,
    tmp: Path,
) -> dict[str, Any]:
    """Replication latency and cold-read throughput; B sees the stores through `urls_b`."""
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
    from tidefs.replica.replicator import Replicator
    from tidefs.replica.store import open_store

    volume = f"bench{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        stores = {r: open_store(u) for r, u in urls_a.items()}  # as region A sees them
        seen_from_b = {r: open_store(u) for r, u in urls_b.items()}
        for store in (*stores.values(), *seen_from_b.values()):
            stack.callback(store.close)
        replicas = _start_replicas(stack, tmp, volume, {"a": journal, "b": journal})
        a, b = replicas["a"], replicas["b"]
        regions = tuple(Region(r, u) for r, u in urls_a.items())
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
        replicator = Replicator(rlog, "b", seen_from_b, tmp / f"{volume}-progress-b", state=b.state)
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
            start = time.perf_counter()  # the copy B would make by hand, across the same link
            seen_from_b["b"].put_block(key, seen_from_b["a"].get_block(key))
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
        fetchers = {wb: BlockFetcher("b", seen_from_b, write_back=wb) for wb in (False, True)}
        for f in fetchers.values():
            stack.callback(f.close)
        megabytes = args.blocks * BLOCK / MIB

        def direct_read(ref: SliceRef) -> int:
            return len(seen_from_b["a"].get_block(block_key(ref.slice_id, 0)))

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
        return {"replication_latency": replication, "cold_read": cold}


def _kafka(tmp: Path, proxy_port: int) -> Any:
    """Start a private Kafka broker whose second listener is reached through `proxy_port`."""
    _import_harness()
    from tests.harness.kafka import KafkaBroker, locate_kafka

    libs, java = locate_kafka()
    broker = KafkaBroker(libs, tmp / "kafka", java=java, proxied_port=proxy_port)
    broker.start()
    return broker


def run(args: argparse.Namespace) -> dict[str, Any]:
    delays = [float(d) for d in args.delay_ms.split(",") if d.strip()]
    report: dict[str, Any] = {"store": args.store, "block_bytes": BLOCK, "delays": {}}
    with tempfile.TemporaryDirectory(prefix="tidefs-bench-") as tmpdir:
        tmp = Path(tmpdir)
        journal = args.journal or f"sqlite://{tmp / 'log.db'}"
        report["journal"] = journal.split(":", 1)[0]
        links = Links()
        report["link"] = {"method": "userspace delay proxy (own process)", "netem": links.netem}
        with store_servers(args.store, tmp) as servers, contextlib.ExitStack() as stack:
            stack.callback(links.close)
            urls_a = {r: url for r, (url, _port) in servers.items()}
            urls_b = dict(urls_a)
            if args.store == "s3":
                url, port = servers["a"]
                assert port is not None
                urls_b["a"] = _via(url, port, links.path(port))
            broker = None
            lag_b = None
            if args.lag_journal == "kafka" and "lag" in args.figures:
                import socket

                with socket.socket() as probe:  # the proxy's port must exist before the broker
                    probe.bind(("127.0.0.1", 0))
                    reserved = probe.getsockname()[1]
                try:
                    broker = _kafka(tmp, reserved)
                except Exception as exc:
                    report["lag_unavailable"] = f"no Kafka broker: {exc}"
                else:
                    stack.callback(broker.stop)
                    assert broker.proxied_listen_port is not None
                    links.path(broker.proxied_listen_port, reserved)
                    lag_b = f"kafka://127.0.0.1:{reserved}"
            for delay in delays:
                links.set_delay(delay)
                row: dict[str, Any] = {}
                if "lag" not in args.figures:
                    pass
                elif broker is not None and lag_b is not None:
                    row["metadata_lag"] = metadata_lag(
                        broker.url, lag_b, tmp, rate=args.rate, seconds=args.seconds
                    )
                elif delay == 0 and args.lag_journal == "sqlite":
                    row["metadata_lag"] = metadata_lag(
                        journal, journal, tmp, rate=args.rate, seconds=args.seconds
                    )
                if "blocks" in args.figures and (delay == 0 or args.store == "s3"):
                    row.update(blocks(args, urls_a, urls_b, journal, tmp))
                report["delays"][f"{delay:g}"] = row
    return report


def print_report(report: dict[str, Any]) -> None:
    link = report["link"]
    print(
        f"stores: {report['store']}, journal: {report['journal']}, block {BLOCK // MIB} MiB; "
        f"link: {link['method']} (netem {link['netem']})"
    )
    if "lag_unavailable" in report:
        print(f"metadata lag: {report['lag_unavailable']}")
    for delay, row in report["delays"].items():
        print(f"-- one-way delay {delay} ms (target: lag p99 <= {float(delay) + 20:g} ms)")
        if "metadata_lag" in row:
            ml = row["metadata_lag"]
            print(
                f"metadata lag A -> B: p50 {ml['p50_ms']} ms, p99 {ml['p99_ms']} ms, "
                f"max {ml['max_ms']} ms ({ml['records']} creates at {ml['rate_per_s']}/s)"
            )
            ap, rest = ml["append_at_a"], ml["acked_to_applied_at_b"]
            print(
                f"  of which: append acknowledged at A p50 {ap['p50_ms']} / p99 {ap['p99_ms']} ms; "
                f"acknowledged -> applied at B p50 {rest['p50_ms']} / p99 {rest['p99_ms']} ms"
            )
        if "replication_latency" not in row:
            continue
        rl = row["replication_latency"]
        print(
            f"written at A -> local at B: p50 {rl['replicated']['p50_ms']} ms, "
            f"p90 {rl['replicated']['p90_ms']} ms ({rl['replicated']['samples']} samples)"
        )
        print(
            f"direct copy A -> B:         p50 {rl['direct_copy']['p50_ms']} ms   "
            f"ratio {rl['ratio_p50']}x (target <= 1.5x)"
        )
        for mode in ("no_write_back", "write_back"):
            for name in ("sequential", "parallel_8"):
                c = row["cold_read"][f"{mode}_{name}"]
                print(
                    f"cold read at B, {mode.replace('_', '-')}, {name}: fallback "
                    f"{c['fallback_MiBps']} MiB/s vs A's store directly "
                    f"{c['primary_direct_MiBps']} MiB/s: ratio {c['ratio']} (target >= 0.7)"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--store", choices=["s3", "file"], default="s3")
    parser.add_argument("--journal", help="journal URL of the block figures (default: SQLite)")
    parser.add_argument(
        "--lag-journal",
        choices=["kafka", "sqlite"],
        default="kafka",
        help="log of the metadata lag figure (delays need kafka)",
    )
    parser.add_argument("--delay-ms", default="0,10,30", help="one-way delays, comma-separated")
    parser.add_argument(
        "--figures",
        type=lambda text: {f.strip() for f in text.split(",") if f.strip()},
        default={"lag", "blocks"},
        help="which figures to measure: lag, blocks, or both (default: lag,blocks)",
    )
    parser.add_argument("--rate", type=float, default=50.0, help="creates per second at A")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the create load")
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
