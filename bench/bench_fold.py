"""Fold throughput: records per second that one core folds into a region's RocksDB state.

The workload is a plausible mix for a data volume: directories and files
created, written in block-sized slices, chmod/utimens/truncate, renames within
and across directories, unlinks with their Reclaim, hard links, symlinks and
xattrs. Envelopes are built directly, so the first number is the fold and
RocksDB alone; when `tidefs.journal.codec` is importable a second run decodes
each record from its Avro bytes first, which is what a replica really does.

    python bench/bench_fold.py [--records N] [--batch B] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from tidefs.journal.commands import (
    ROOT_INODE,
    CommitSlice,
    CreateVolume,
    Envelope,
    Link,
    Mkdir,
    Mknod,
    Reclaim,
    Region,
    Rename,
    SetAttr,
    SetXattr,
    SliceRef,
    Symlink,
    Unlink,
    inode_for_offset,
)
from tidefs.replica.fold import OUTCOME_WINDOW
from tidefs.replica.state import State

BLOCK = 4 << 20
CHUNK = 64 << 20

MIX: dict[str, int] = {
    "mkdir": 4,
    "create": 20,
    "write": 36,
    "setattr": 14,
    "rename": 10,
    "unlink": 6,
    "xattr": 5,
    "link": 2,
    "symlink": 3,
}
"""Relative weight of each kind of operation in the generated workload."""


def workload(n: int, seed: int = 1) -> list[tuple[int, Envelope]]:
    """Return `n` (offset, envelope) records of the mix, offsets 0..n-1, almost all valid."""
    rng = random.Random(seed)
    out: list[tuple[int, Envelope]] = []
    t = 1_700_000_000_000_000_000
    dirs: list[int] = [ROOT_INODE]
    files: list[tuple[int, int, bytes]] = []  # (ino, parent, name)
    sizes: dict[int, int] = {}
    serial = 0
    kinds = list(MIX)
    weights = [MIX[k] for k in kinds]

    def add(cmd: Any) -> int:
        """Append a record of `cmd` at the next offset; return that offset."""
        offset = len(out)
        out.append((offset, Envelope(cmd, "bench", t + offset * 1000, rng.randbytes(16))))
        return offset

    add(
        CreateVolume(
            "bench",
            (Region("bench", "file:///bench"),),
            "bench",
            chunk_size=CHUNK,
            block_size=BLOCK,
        )
    )
    while len(out) < n:
        kind = rng.choices(kinds, weights)[0]
        serial += 1
        name = f"n{serial:08d}.bin".encode()
        if kind == "mkdir" or (not files and kind != "create"):
            parent = rng.choice(dirs)
            off = add(Mkdir(parent, f"d{serial}".encode(), 0o755, 1000, 1000))
            dirs.append(inode_for_offset(off))
        elif kind == "create":
            parent = rng.choice(dirs)
            off = add(Mknod(parent, name, stat.S_IFREG | 0o644, 1000, 1000))
            ino = inode_for_offset(off)
            files.append((ino, parent, name))
            sizes[ino] = 0
        elif kind == "write":
            ino = rng.choice(files)[0]
            pos = sizes[ino]
            length = rng.choice((BLOCK, BLOCK, 1 << 20, 64 << 10))
            index, within = divmod(pos, CHUNK)
            length = min(length, CHUNK - within)
            s = SliceRef(rng.getrandbits(63), within, length, BLOCK, "bench")
            add(CommitSlice(ino, index, s))
            sizes[ino] = pos + length
        elif kind == "setattr":
            ino = rng.choice(files)[0]
            r = rng.random()
            if r < 0.4:
                add(SetAttr(ino, mode=0o600))
            elif r < 0.8:
                add(SetAttr(ino, atime=t, mtime=t))
            else:
                sizes[ino] = sizes[ino] // 2
                add(SetAttr(ino, size=sizes[ino]))
        elif kind == "rename":
            i = rng.randrange(len(files))
            ino, parent, old = files[i]
            new_parent = rng.choice(dirs)
            add(Rename(parent, old, new_parent, name))
            files[i] = (ino, new_parent, name)
        elif kind == "unlink":
            ino, parent, old = files.pop(rng.randrange(len(files)))
            add(Unlink(parent, old))
            if len(out) < n:
                add(Reclaim(ino))
        elif kind == "xattr":
            ino = rng.choice(files)[0]
            add(SetXattr(ino, b"user.tag", rng.randbytes(24)))
        elif kind == "link":
            ino = rng.choice(files)[0]
            add(Link(ino, rng.choice(dirs), b"l" + name))
        else:
            add(Symlink(rng.choice(dirs), b"s" + name, b"../target/" + name, 1000, 1000))
    return out[:n]


def fold_rate(
    records: Sequence[tuple[int, Envelope]], batch: int, window: int = OUTCOME_WINDOW
) -> dict[str, float]:
    """Fold `records` into a fresh state in batches of `batch`; return timings."""
    tmp = tempfile.mkdtemp(prefix="tidefs-bench-")
    try:
        state = State.open(tmp, outcome_window=window)
        rejected = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(0, len(records), batch):
            result = state.apply(records[i : i + batch])
            rejected += sum(1 for o in result.outcomes if o.errno)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        state.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "seconds": elapsed,
        "records_per_s": len(records) / elapsed,
        "records_per_cpu_s": len(records) / cpu,
        "rejected": rejected,
    }


def decode_fold_rate(
    records: Sequence[tuple[int, Envelope]], batch: int, window: int = OUTCOME_WINDOW
) -> dict[str, float] | None:
    """As fold_rate, but every record is Avro-encoded first and decoded inside the timed loop."""
    try:
        from tidefs.journal import codec
    except ImportError:
        return None
    payloads = [(off, codec.encode(env)) for off, env in records]
    tmp = tempfile.mkdtemp(prefix="tidefs-bench-")
    try:
        state = State.open(tmp, outcome_window=window)
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(0, len(payloads), batch):
            chunk = [(off, codec.decode(p)) for off, p in payloads[i : i + batch]]
            state.apply(chunk)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        state.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "seconds": elapsed,
        "records_per_s": len(records) / elapsed,
        "records_per_cpu_s": len(records) / cpu,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print records per second (as JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--window",
        type=int,
        default=10_000,
        help="outcome window; smaller than --records so the run includes the steady-state "
        "cost of trimming outcomes (a live volume is always past its window)",
    )
    parser.add_argument("--no-codec", action="store_true", help="skip the decode+fold run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    records = workload(args.records, args.seed)
    result: dict[str, Any] = {
        "records": len(records),
        "batch": args.batch,
        "window": args.window,
        "fold": fold_rate(records, args.batch, args.window),
    }
    if not args.no_codec:
        result["decode_fold"] = decode_fold_rate(records, args.batch, args.window)
    if args.json:
        print(json.dumps(result))
        return 0
    fold = result["fold"]
    print(
        f"fold:         {fold['records_per_s']:>10,.0f} records/s "
        f"({fold['records_per_cpu_s']:,.0f} per CPU second; {len(records):,} records "
        f"in {fold['seconds']:.2f}s, batch {args.batch}, {fold['rejected']} rejected)"
    )
    both = result.get("decode_fold")
    if both:
        print(
            f"decode+fold:  {both['records_per_s']:>10,.0f} records/s "
            f"({both['records_per_cpu_s']:,.0f} per CPU second)"
        )
    elif not args.no_codec:
        print("decode+fold:  skipped (tidefs.journal.codec is not available)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
