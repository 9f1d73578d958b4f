"""File-system benchmark: a tidefs mount against tmpfs, on the same machine, in the same run.

A fresh volume (embedded defaults: SQLite log, directory store; 64 MiB chunks,
4 MiB blocks) is formatted and mounted in a subprocess, exactly as a user
mounts it; the reference is a directory in /dev/shm (tmpfs). Each workload
runs on both and is reported as an absolute figure and as a ratio to tmpfs:

- sequential write of a large file (1 MiB writes, fsync, close), then a
  sequential read of it with the page cache dropped (the mount's read path);
- 4 KiB overwrites at random offsets inside that file, each fsynced
  (durable, the database pattern) and without fsync (buffered);
- create + stat + unlink of many small files (metadata round trips);
- rename of a directory holding many files.

    python -m bench fs [-- --size-mib N --files N --json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tidefs.fs.mount import umount
from tidefs.fs.volume import format_volume
from tidefs.journal.commands import Region


def mount(root: Path) -> tuple[Path, subprocess.Popen[bytes]]:
    """Format a volume under `root` and mount it; return the mount point and its process."""
    journal = f"sqlite:///{root}/journal.db"
    format_volume(journal, "bench", [Region("a", (root / "store").as_uri())], "a")
    mnt = root / "mnt"
    mnt.mkdir()
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidefs.fs.mount", "bench", str(mnt), "--journal", journal,
         "--region", "a", "--state-dir", str(root / "state"), "--cache-dir", str(root / "cache"),
         "--foreground", "--ready-fd", str(w)],
        stdout=open(root / "mount.log", "ab"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        pass_fds=(w,),
    )  # fmt: skip
    os.close(w)
    ready, _, _ = select.select([r], [], [], 60)
    line = os.read(r, 4096) if ready else b""
    os.close(r)
    if line != b"ready\n":
        proc.kill()
        raise SystemExit(f"bench: mount failed: {line!r}; see {root / 'mount.log'}")
    return mnt, proc


def timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def seq_write(path: Path, size: int) -> Callable[[], None]:
    block = random.Random(0).randbytes(1 << 20)

    def run() -> None:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        for _ in range(size >> 20):
            os.write(fd, block)
        os.fsync(fd)
        os.close(fd)

    return run


def seq_read(path: Path) -> Callable[[], None]:
    def run() -> None:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 1 << 20):
            pass
        os.close(fd)

    return run


def overwrite(path: Path, size: int, count: int, sync: bool) -> Callable[[], None]:
    rng = random.Random(1)
    offsets = [rng.randrange(0, size - 4096) & ~4095 for _ in range(count)]
    page = rng.randbytes(4096)

    def run() -> None:
        fd = os.open(path, os.O_WRONLY)
        for off in offsets:
            os.pwrite(fd, page, off)
            if sync:
                os.fsync(fd)
        os.close(fd)

    return run


def small_files(base: Path, count: int) -> Callable[[], None]:
    def run() -> None:
        d = base / "small"
        d.mkdir()
        for i in range(count):
            p = d / f"f{i}"
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
            os.stat(p)
            os.unlink(p)
        d.rmdir()

    return run


def rename_dir(base: Path, count: int) -> tuple[Callable[[], None], Callable[[], None]]:
    src, dst = base / "tree", base / "moved"

    def setup() -> None:
        src.mkdir()
        for i in range(count):
            (src / f"f{i}").write_bytes(b"x")

    def run() -> None:
        os.rename(src, dst)
        os.listdir(dst)

    return setup, run


def workloads(base: Path, size: int, files: int) -> list[tuple[str, str, float, float]]:
    """Run every workload in `base`; return (name, unit, amount, seconds)."""
    out = []
    big = base / "big"
    out.append(("sequential write", "MiB/s", size / (1 << 20), timed(seq_write(big, size))))
    out.append(("sequential read (cold)", "MiB/s", size / (1 << 20), timed(seq_read(big))))
    n = 300
    out.append(("4 KiB overwrite + fsync", "ops/s", n, timed(overwrite(big, size, n, True))))
    n = 5000
    out.append(("4 KiB overwrite, buffered", "ops/s", n, timed(overwrite(big, size, n, False))))
    out.append(("create+stat+unlink", "files/s", files, timed(small_files(base, files))))
    setup, run = rename_dir(base, files)
    setup()
    out.append((f"rename dir of {files} files", "renames/s", 1, timed(run)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench fs", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256, help="size of the large file")
    p.add_argument("--files", type=int, default=500, help="small files per metadata workload")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    size = args.size_mib << 20

    root = Path(tempfile.mkdtemp(prefix="tidefs-bench-fs-"))
    ref = Path(tempfile.mkdtemp(prefix="tidefs-bench-ref-", dir="/dev/shm"))
    mnt, proc = mount(root)
    try:
        mine = workloads(mnt, size, args.files)
        theirs = workloads(ref, size, args.files)
    finally:
        umount(str(mnt))
        proc.wait(60)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(ref, ignore_errors=True)

    rows: list[dict[str, Any]] = []
    for (name, unit, amount, secs), (_, _, _, ref_secs) in zip(mine, theirs, strict=True):
        rate, ref_rate = amount / secs, amount / ref_secs
        rows.append(
            {"workload": name, "unit": unit, "tidefs": rate, "tmpfs": ref_rate,
             "ratio": rate / ref_rate}
        )  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'workload':<28} {'tidefs':>12} {'tmpfs':>12}  {'unit':<10} ratio")
    for r in rows:
        print(
            f"{r['workload']:<28} {r['tidefs']:>12.1f} {r['tmpfs']:>12.1f}  "
            f"{r['unit']:<10} {r['ratio']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
