"""File-system benchmark: tidefs mounts against tmpfs, the raw store and s3fs-fuse, in one run.

Targets, each a directory that the same workloads run in:

- `tmpfs`: a fresh directory in /dev/shm, the reference every ratio is taken to;
- `tidefs-file`: a tidefs mount (embedded SQLite log, directory store), exactly
  as a user mounts it, in its own process;
- `tidefs-s3`: a tidefs mount on a bucket of a local S3 endpoint (moto's
  server on loopback, or with `--s3-server gofakes3` an S3 server in Go whose
  requests cost far less than moto's);
- `s3fs`: s3fs-fuse on another bucket of the same endpoint (reported as failed,
  never crashing the run, when s3fs is missing or misbehaves).

Workloads (sizes of the full run; `--quick` and `--tiny` scale them down):

- sequential write of a 1 GiB file (1 MiB writes, fsync, close), then sequential
  reads of it, cold (fresh mount, its block cache emptied, the kernel's page
  cache dropped) and warm (read again at once, three times: the median run
  counts); on tidefs targets also two references measured in the same run:
  the same bytes written straight to the store right after the write (a file
  in the store directory, 1 MiB writes and fsync; on S3 boto3's multipart
  upload) and the file's blocks read straight from the block store
  (`BlockStore.get_block`, cold);
- 4 KiB overwrites at random offsets in that file, each `pwrite` + `fsync`
  (the median latency); on tidefs targets also the reference of that
  figure, measured right after it: 4 KiB made durable straight in the store's
  medium (a boto3 `put_object` on S3; `pwrite` + `fsync` of a local file
  beside a directory store);
- append 1 KiB x 1000: open with O_APPEND, write 1 KiB, close, 1000 times
  (each close makes the bytes visible to other regions);
- create + stat + unlink 10,000 files: 1 thread; 8 threads with a directory
  each (the kernel serialises creates and unlinks inside one directory); and
  8 threads in one directory;
- small files: 3,000 files of 4-16 KiB written by one thread (create, one
  write, close), then read cold by 4 threads (fresh mount, page cache
  dropped; open, read all, close), in files/s;
- rename of a directory holding 10,000 files (latency of the rename);
- `tar -xf` of a synthetic source tree (3,000 small files in folders);
- model loading: a synthetic 2 GiB safetensors file loaded with
  `safetensors.numpy.load_file`, and the same tensors in a pickle, single
  thread, cold and warm (the median of three runs); on tidefs targets also the
  file's blocks read straight from the store, cold.

The target check at the end prints each target of the data-path issue (CHECKS)
on each tidefs target as met or not, with the figure, its reference and the
ratio (`--json`: the `targets` list; `--markdown`: the table of
docs/BENCHMARKS.md).

Every workload runs in a child process with a time bound (`--step-timeout`):
at the bound it starts no further operation and its figure is the rate over
the operations it completed, marked partial ("partial: 1,800 of 10,000 files
in 120 s"); a single operation that never returns (loading a model, one
rename) is killed a grace period later and reported as a bound ("at most" /
"at least"). A step that fails is reported as such and the run goes on.
`--workloads` runs a subset (e.g. `seq`, `small` or `seq_write,seq_read_cold`). Figures are printed
as absolute values and as speed ratios to tmpfs (1.0 = as fast as tmpfs; for
latencies the ratio is tmpfs' latency over the target's). Cold runs drop the
kernel's page cache (`/proc/sys/vm/drop_caches`, as root; skipped otherwise).

    python -m bench fs [-- --quick --targets tmpfs,tidefs-file --workloads seq --json]
    python -m bench fs -- --targets tmpfs,tidefs-file,tidefs-s3 --s3-server gofakes3 --markdown
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
TARGETS = ("tmpfs", "tidefs-file", "tidefs-s3", "s3fs")


@dataclass(frozen=True)
class Scale:
    """Sizes of one run."""

    big_mib: int = 1024
    overwrites: int = 100
    appends: int = 1000
    files: int = 10_000
    tree_files: int = 3000  # small files: of the tar tree, and written then read cold
    model_mib: int = 2048
    tensor_mib: int = 64
    timeout: float = 900.0


SCALES = {
    "full": Scale(),
    "quick": Scale(
        big_mib=128, overwrites=50, appends=200, files=1000, tree_files=500,
        model_mib=128, tensor_mib=16, timeout=300.0,
    ),
    "tiny": Scale(
        big_mib=8, overwrites=5, appends=10, files=20, tree_files=20,
        model_mib=4, tensor_mib=1, timeout=120.0,
    ),
}  # fmt: skip


# --- workloads: each runs in a child process and returns a Done ----------------------------


@dataclass(frozen=True)
class Done:
    """What a workload did: `amount` of `planned` (MiB, files, ops) in `seconds`.

    A workload stops early, with `amount < planned`, when its time runs out
    (`BENCH_DEADLINE`): its figure is then the rate over what it completed.
    """

    amount: float
    seconds: float
    planned: float
    note: str = ""
    p50: float | None = None
    """The median seconds of one operation, for workloads judged on latency."""


T = TypeVar("T")


def _deadline() -> float:
    """The wall-clock time (`time.time()`) by which this worker stops starting operations."""
    return float(os.environ.get("BENCH_DEADLINE", "inf"))


def _in_time(items: Iterable[T]) -> Iterator[T]:
    """`items`, as long as the worker's deadline has not passed before the next one."""
    deadline = _deadline()
    for item in items:
        if time.time() >= deadline:
            return
        yield item


def _big_block() -> bytes:
    """The 1 MiB written over and over to make the big file (and its raw references)."""
    return random.Random(0).randbytes(MIB)


def _write_big(path: Path, s: Scale) -> Done:
    """Write the big file's bytes to `path` in 1 MiB writes, fsync, close."""
    block = _big_block()
    written = 0
    started = time.perf_counter()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    for _ in _in_time(range(s.big_mib)):
        os.write(fd, block)
        written += 1
    os.fsync(fd)
    os.close(fd)
    return Done(written, time.perf_counter() - started, s.big_mib)


def _seq_write(d: Path, s: Scale) -> Done:
    return _write_big(d / "big", s)


def _seq_read(d: Path, s: Scale) -> Done:
    """Read the big file (as long as the write made it; a partial write reads less)."""
    deadline = _deadline()
    started = time.perf_counter()
    total = 0
    fd = os.open(d / "big", os.O_RDONLY)
    size = os.fstat(fd).st_size
    while time.time() < deadline and (chunk := os.read(fd, MIB)):
        total += len(chunk)
    os.close(fd)
    if total < size and time.time() < deadline:
        raise RuntimeError(f"read {total} bytes of {size}")
    return Done(total / MIB, time.perf_counter() - started, s.big_mib)


def _overwrite(d: Path, s: Scale) -> Done:
    rng = random.Random(1)
    size = os.stat(d / "big").st_size
    offsets = [rng.randrange(0, size - 4096) & ~4095 for _ in range(s.overwrites)]
    fd = os.open(d / "big", os.O_WRONLY)
    try:
        return _durable_pages(fd, rng.randbytes(4096), offsets)
    finally:
        os.close(fd)


def _durable_pages(fd: int, page: bytes, offsets: list[int]) -> Done:
    """`pwrite` + `fsync` of `page` at each offset in turn, until the step's deadline."""

    def durable_page(off: int) -> None:
        os.pwrite(fd, page, off)
        os.fsync(fd)

    return _each_timed(offsets, durable_page)


def _each_timed(items: Sequence[T], op: Callable[[T], object]) -> Done:
    """`op` on each item in turn until the deadline, with the median latency of one (`p50`)."""
    latencies = []
    started = time.perf_counter()
    for item in _in_time(items):
        t0 = time.perf_counter()
        op(item)
        latencies.append(time.perf_counter() - t0)
    p50 = statistics.median(latencies) if latencies else None
    return Done(len(latencies), time.perf_counter() - started, len(items), p50=p50)


def _append(d: Path, s: Scale) -> Done:
    line = b"x" * 1023 + b"\n"
    path = d / "appended.log"
    done = 0
    started = time.perf_counter()
    for _ in _in_time(range(s.appends)):
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        os.write(fd, line)
        os.close(fd)
        done += 1
    elapsed = time.perf_counter() - started
    if done and os.stat(path).st_size != done * 1024:
        raise RuntimeError("appended file has the wrong size")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return Done(done, elapsed, s.appends)


def _in_threads(threads: int, work: Callable[[int], None]) -> float:
    """Run `work(0)` .. `work(threads - 1)` side by side; the seconds they took together.

    The first error a thread raised is raised here, once all have stopped.
    """
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            work(t)
        except BaseException as e:
            errors.append(e)

    started = time.perf_counter()
    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


def _csu(d: Path, s: Scale, threads: int, shared: bool) -> Done:
    """Create, stat and unlink `s.files` files, spread over `threads` threads.

    With `shared`, every thread works in one directory: the kernel then runs
    creates and unlinks of that directory one at a time (its inode lock), so
    the figure is one request's latency. Otherwise each thread has a
    directory of its own (mdtest's unique-directory mode), and the requests
    really run side by side.
    """
    base = d / f"csu{threads}{'s' if shared else ''}"
    base.mkdir()
    dirs = [base if shared else base / f"t{t}" for t in range(threads)]
    for sub in dirs:
        sub.mkdir(exist_ok=True)
    done = [0] * threads

    def work(t: int) -> None:
        for i in _in_time(range(t, s.files, threads)):
            p = dirs[t] / f"f{i}"
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
            os.stat(p)
            os.unlink(p)
            done[t] += 1

    elapsed = _in_threads(threads, work)
    for sub in dirs:
        if sub != base:
            sub.rmdir()
    base.rmdir()
    return Done(sum(done), elapsed, s.files)


def _csu1(d: Path, s: Scale) -> Done:
    return _csu(d, s, 1, shared=True)


def _csu8(d: Path, s: Scale) -> Done:
    return _csu(d, s, 8, shared=False)


def _csu8s(d: Path, s: Scale) -> Done:
    return _csu(d, s, 8, shared=True)


SMALL_READERS = 4
"""Threads of the cold small-file read (the issue's figure: 4)."""


def _small_contents(s: Scale) -> list[bytes]:
    """The small files' bytes: `s.tree_files` files of 4 to 16 KiB, each its own random bytes."""
    rng = random.Random(5)
    return [rng.randbytes(rng.randrange(4 << 10, (16 << 10) + 1)) for _ in range(s.tree_files)]


def _small_write(d: Path, s: Scale) -> Done:
    """One thread writes the small files into `small/`: create, one write, close each."""
    contents = _small_contents(s)  # made before the clock starts
    small = d / "small"
    small.mkdir()
    done = 0
    started = time.perf_counter()
    for i in _in_time(range(len(contents))):
        fd = os.open(small / f"f{i}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        os.write(fd, contents[i])
        os.close(fd)
        done += 1
    return Done(done, time.perf_counter() - started, s.tree_files)


def _small_read(d: Path, s: Scale) -> Done:
    """`SMALL_READERS` threads read the small files `_small_write` made: open, read all, close.

    The file names are known, not listed, so that no readdir warms the
    mount's view of the directory before the clock starts.
    """
    small = d / "small"
    count = s.tree_files
    if not os.path.exists(small / f"f{count - 1}"):  # the write ran out of time
        count = len(os.listdir(small))
    sizes = [len(c) for c in _small_contents(s)[:count]]
    done = [0] * SMALL_READERS

    def work(t: int) -> None:
        for i in _in_time(range(t, count, SMALL_READERS)):
            fd = os.open(small / f"f{i}", os.O_RDONLY)
            total = 0
            while chunk := os.read(fd, MIB):
                total += len(chunk)
            os.close(fd)
            if total != sizes[i]:
                raise RuntimeError(f"read {total} bytes of small file {i}, not {sizes[i]}")
            done[t] += 1

    elapsed = _in_threads(SMALL_READERS, work)
    note = (
        "" if count == s.tree_files else f"partial: {count:,} files written, not {s.tree_files:,}"
    )
    return Done(sum(done), elapsed, count, note)


def _mkfiles(d: Path, s: Scale) -> Done:
    tree = d / "tree"
    tree.mkdir()
    done = 0
    started = time.perf_counter()
    for i in _in_time(range(s.files)):
        os.close(os.open(tree / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
        done += 1
    return Done(done, time.perf_counter() - started, s.files)


def _rename(d: Path, s: Scale) -> Done:
    """Rename the directory `_mkfiles` made (of fewer files than planned if it ran out of time)."""
    files = len(os.listdir(d / "tree"))
    started = time.perf_counter()
    os.rename(d / "tree", d / "moved")
    elapsed = time.perf_counter() - started
    if len(os.listdir(d / "moved")) != files:
        raise RuntimeError("renamed directory lost files")
    note = "" if files == s.files else f"partial: a directory of {files:,} files, not {s.files:,}"
    return Done(1, elapsed, 1, note)


def _tar(d: Path, s: Scale) -> Done:
    tarball = Path(os.environ["BENCH_TARBALL"])
    dest = d / "src"
    dest.mkdir()
    deadline = _deadline()
    started = time.perf_counter()
    tar = subprocess.Popen(["tar", "-xf", str(tarball), "-C", str(dest)])
    while tar.poll() is None and time.time() < deadline:  # bounded: by the deadline
        with contextlib.suppress(subprocess.TimeoutExpired):
            tar.wait(min(1.0, max(0.0, deadline - time.time())))
    if tar.returncode is None:  # out of time: count what it extracted
        tar.kill()
        tar.wait()
        elapsed = time.perf_counter() - started
        done = sum(len(files) for _, _, files in os.walk(dest))
        return Done(done, elapsed, s.tree_files)
    elapsed = time.perf_counter() - started
    if tar.returncode != 0:
        raise RuntimeError(f"tar exited with {tar.returncode}")
    return Done(s.tree_files, elapsed, s.tree_files)


def _load_safetensors(d: Path, s: Scale) -> Done:
    from safetensors.numpy import load_file

    started = time.perf_counter()
    tensors = load_file(str(d / "model.safetensors"))
    elapsed = time.perf_counter() - started
    if sum(t.nbytes for t in tensors.values()) != s.model_mib * MIB:
        raise RuntimeError("safetensors loaded the wrong size")
    return Done(s.model_mib, elapsed, s.model_mib)


def _load_pickle(d: Path, s: Scale) -> Done:
    started = time.perf_counter()
    with open(d / "model.pkl", "rb") as f:
        tensors = pickle.load(f)
    elapsed = time.perf_counter() - started
    if sum(t.nbytes for t in tensors.values()) != s.model_mib * MIB:
        raise RuntimeError("pickle loaded the wrong size")
    return Done(s.model_mib, elapsed, s.model_mib)


MODEL_FILES = {"safetensors": "model.safetensors", "pickle": "model.pkl"}


def _copy_model(d: Path, s: Scale) -> Done:
    """Copy the model file `BENCH_COPY` (default: both) into the target.

    Not a figure; bounded like a workload.
    """
    deadline = _deadline()
    copied = planned = 0
    started = time.perf_counter()
    names = os.environ.get("BENCH_COPY", ",".join(MODEL_FILES.values())).split(",")
    for name in names:
        src = Path(os.environ["BENCH_MODEL_DIR"]) / name
        planned += src.stat().st_size
        with open(src, "rb") as fin, open(d / name, "wb") as fout:
            while time.time() < deadline and (chunk := fin.read(MIB)):
                fout.write(chunk)
                copied += len(chunk)
    return Done(copied / MIB, time.perf_counter() - started, planned / MIB)


def _raw_store(d: Path, s: Scale) -> Done:
    """Read the blocks listed in `BENCH_BLOCKS` (the file a workload reads) with get_block.

    Without `BENCH_BLOCKS`, every block of the store.
    """
    from tidefs.replica.store import open_store

    store = open_store(os.environ["BENCH_STORE_URL"])
    listed = os.environ.get("BENCH_BLOCKS")
    keys = Path(listed).read_text().split() if listed else list(store.list())
    total = 0
    started = time.perf_counter()
    for key in _in_time(keys):
        total += len(store.get_block(key))
    elapsed = time.perf_counter() - started
    store.close()
    return Done(total / MIB, elapsed, float(os.environ.get("BENCH_PLANNED_MIB", s.big_mib)))


def _s3_client(url: SplitResult) -> tuple[Any, str, str]:
    """A boto3 client of the store's S3 endpoint, as a user makes one: (client, bucket, prefix).

    boto3's default settings but for the `Expect: 100-continue` handshake,
    which tidefs' store leaves out of small puts too.
    """
    import boto3

    from tidefs.replica.store import no_expect_for_small_body

    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    client = boto3.session.Session().client(
        "s3", endpoint_url=query.get("endpoint"), region_name=query.get("region")
    )
    client.meta.events.register_last("before-call.s3", no_expect_for_small_body)
    return client, url.netloc, url.path.strip("/")


class _BigFileReader(io.RawIOBase):
    """The big file's bytes as a stream (never all in memory), ending early at the deadline."""

    def __init__(self, s: Scale) -> None:
        self.block = _big_block()
        self.left = s.big_mib * MIB
        self.deadline = _deadline()
        self.sent = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left <= 0 or time.time() >= self.deadline:
            return 0
        at = self.sent % MIB
        n = min(len(buffer), MIB - at, self.left)
        buffer[:n] = self.block[at : at + n]
        self.sent += n
        self.left -= n
        return n


def _raw_write(d: Path, s: Scale) -> Done:
    """Write the big file's bytes straight to the store's medium: the sequential write's reference.

    On a directory store, one file in the store directory (a dot name, which
    the store never lists) in 1 MiB writes, fsync, close; on S3, boto3's own
    multipart upload (`upload_fileobj`, default transfer settings: 8 MiB parts,
    10 at once) of one object beside the store's prefix.
    """
    url = urlsplit(os.environ["BENCH_STORE_URL"])
    if url.scheme != "s3":
        path = Path(unquote(url.path)) / ".bench-raw-write"
        try:
            return _write_big(path, s)
        finally:
            path.unlink()
    client, bucket, prefix = _s3_client(url)
    key = f"{prefix}-raw/big"
    stream = _BigFileReader(s)
    started = time.perf_counter()
    client.upload_fileobj(stream, bucket, key)
    elapsed = time.perf_counter() - started
    client.delete_object(Bucket=bucket, Key=key)
    client.close()
    return Done(stream.sent / MIB, elapsed, s.big_mib)


def _raw_put(d: Path, s: Scale) -> Done:
    """Write 4 KiB pages straight to the target's store medium: the overwrite's reference.

    On S3, a `put_object` of a 4 KiB object (a fresh key each time, as every
    overwrite makes a new block) with the client of `_s3_client`, so that the
    difference between the two figures is what the mount adds; on a
    directory store, `pwrite` + `fsync` of 4 KiB in a file beside the store.
    An overwrite through the mount cannot be faster than this: it also
    appends to the log and waits for the fold.
    """
    url = urlsplit(os.environ["BENCH_STORE_URL"])
    rng = random.Random(4)
    page = rng.randbytes(4096)
    if url.scheme == "s3":
        client, bucket, prefix = _s3_client(url)
        client.put_object(Bucket=bucket, Key=f"{prefix}-raw/warm-up", Body=page)  # connect
        try:
            return _each_timed(
                range(s.overwrites),
                lambda i: client.put_object(Bucket=bucket, Key=f"{prefix}-raw/{i}", Body=page),
            )
        finally:
            client.close()
    path = Path(url.path).parent / "raw-put"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        return _durable_pages(fd, page, [rng.randrange(0, 256) * 4096 for _ in range(s.overwrites)])
    finally:
        os.close(fd)
        path.unlink()


WORKERS: dict[str, Callable[[Path, Scale], Done]] = {
    "seq_write": _seq_write,
    "seq_read": _seq_read,
    "overwrite": _overwrite,
    "append": _append,
    "csu1": _csu1,
    "csu8": _csu8,
    "csu8s": _csu8s,
    "mkfiles": _mkfiles,
    "rename": _rename,
    "tar": _tar,
    "load_safetensors": _load_safetensors,
    "load_pickle": _load_pickle,
    "copy_model": _copy_model,
    "raw_store": _raw_store,
    "raw_put": _raw_put,
    "raw_write": _raw_write,
    "small_write": _small_write,
    "small_read": _small_read,
}


def worker_main(name: str, d: str, scale: str) -> int:
    """Child side: run one workload and print its Done as JSON."""
    print(json.dumps(asdict(WORKERS[name](Path(d), SCALES[scale]))))
    return 0


# --- targets --------------------------------------------------------------------------------


DROP_CACHES = True
"""Whether cold runs drop the kernel's page cache (`--no-drop-caches` turns it off)."""


def drop_page_cache() -> None:
    """Drop the kernel's clean page cache (root only; quietly skipped otherwise)."""
    if not DROP_CACHES:
        return
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait up to a minute for an unmounted file system's process, then kill it."""
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_ready(r: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    ready, _, _ = select.select([r], [], [], timeout)
    line = os.read(r, 4096) if ready else b""
    os.close(r)
    if line != b"ready\n":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"mount failed: {line!r}; see {log}")


def _is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


class Target:
    """A directory to run the workloads in; `cold()` makes the next read come from storage."""

    name = ""
    store_url: str | None = None

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def dir(self) -> Path:
        raise NotImplementedError

    def start(self) -> None:
        pass

    def cold(self) -> None:
        drop_page_cache()

    def stop(self) -> None:
        pass


class Tmpfs(Target):
    name = "tmpfs"

    @property
    def dir(self) -> Path:
        return self.root

    def stop(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class TidefsMount(Target):
    """A tidefs mount in its own process, on a directory store or an S3 bucket."""

    def __init__(self, root: Path, name: str, store_url: str) -> None:
        super().__init__(root)
        self.name = name
        self.store_url = store_url
        self.journal = f"sqlite:///{root}/journal.db"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dir(self) -> Path:
        return self.root / "mnt"

    def start(self) -> None:
        from tidefs.fs.volume import format_volume
        from tidefs.journal.commands import Region

        format_volume(self.journal, "bench", [Region("a", self.store_url or "")], "a")
        self.dir.mkdir()
        self._mount()

    def _mount(self) -> None:
        log = self.root / "mount.log"
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidefs.fs.mount", "bench", str(self.dir),
             "--journal", self.journal, "--region", "a",
             "--state-dir", str(self.root / "state"), "--cache-dir", str(self.root / "cache"),
             "--cache-size", str(8 << 30), "--foreground", "--ready-fd", str(w)],
            stdout=open(log, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            pass_fds=(w,),
        )  # fmt: skip
        os.close(w)
        _wait_ready(r, self.proc, log)

    def _umount(self) -> None:
        from tidefs.fs.mount import umount

        if self.proc is None:
            return
        if _is_mounted(self.dir):
            umount(str(self.dir))
        _reap(self.proc)
        self.proc = None

    def cold(self) -> None:
        self._umount()
        shutil.rmtree(self.root / "cache", ignore_errors=True)
        drop_page_cache()
        self._mount()

    def stop(self) -> None:
        self._umount()
        shutil.rmtree(self.root, ignore_errors=True)


class S3fs(Target):
    """s3fs-fuse on a bucket of the local S3 endpoint."""

    name = "s3fs"

    def __init__(self, root: Path, endpoint: str, bucket: str) -> None:
        super().__init__(root)
        self.endpoint, self.bucket = endpoint, bucket
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dir(self) -> Path:
        return self.root / "mnt"

    def start(self) -> None:
        if shutil.which("s3fs") is None:
            raise RuntimeError("s3fs is not installed (Debian package s3fs)")
        self.dir.mkdir()
        passwd = self.root / "passwd"
        passwd.write_text("testing:testing\n")
        passwd.chmod(0o600)
        self._mount()

    def _mount(self) -> None:
        opts = (
            f"url={self.endpoint},use_path_request_style,passwd_file={self.root / 'passwd'},"
            "endpoint=us-east-1,stat_cache_expire=1"
        )
        self.proc = subprocess.Popen(
            ["s3fs", self.bucket, str(self.dir), "-f", "-o", opts],
            stdout=open(self.root / "s3fs.log", "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )
        for _ in range(300):  # bounded: 30 s
            if _is_mounted(self.dir):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self._umount()
        raise RuntimeError(f"s3fs did not mount; see {self.root / 's3fs.log'}")

    def _umount(self) -> None:
        if self.proc is None:
            return
        if _is_mounted(self.dir):
            subprocess.run(["fusermount3", "-u", str(self.dir)], check=False)
        _reap(self.proc)
        self.proc = None

    def cold(self) -> None:
        self._umount()
        drop_page_cache()
        self._mount()

    def stop(self) -> None:
        self._umount()
        shutil.rmtree(self.root, ignore_errors=True)


# --- the run ------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured figure of one target."""

    target: str
    workload: str
    unit: str
    value: float | None
    error: str | None = None
    note: str | None = None
    """Set when the figure is partial (the step ran out of time) or otherwise qualified."""


CSU_OPS = 3
"""Operations per file of the create+stat+unlink loop: create, stat, unlink."""


@dataclass(frozen=True)
class Workload:
    """How to turn a worker's (amount, seconds) into a figure."""

    key: str
    label: str
    unit: str  # "MiB/s", "ops/s", "files/s" (higher is better) or "ms" (lower is better)
    noun: str = "MiB"  # what the worker's amount counts
    per: int = 1  # operations per counted amount (ops/s of a per-file loop)
    p50: bool = False  # a latency judged by its median (Done.p50), not its mean

    def figure(self, amount: float, seconds: float) -> float:
        if self.unit == "ms":
            return seconds / amount * 1000
        return amount * self.per / seconds

    def of(self, done: Done) -> float:
        """The figure of what a worker did."""
        if self.p50 and done.p50 is not None:
            return done.p50 * 1000
        return self.figure(done.amount, done.seconds)


WORKLOADS = {
    w.key: w
    for w in (
        Workload("seq_write", "sequential write", "MiB/s"),
        # A directory store: a file in its directory, fsync; S3: boto3's multipart upload.
        Workload("raw_write", "same bytes straight to the store", "MiB/s"),
        Workload("seq_read_cold", "sequential read, cold", "MiB/s"),
        Workload("raw_store", "same blocks from the store, cold", "MiB/s"),
        Workload("seq_read_warm", "sequential read, warm", "MiB/s"),
        Workload("overwrite", "4 KiB overwrite + fsync, p50", "ms", "overwrites", p50=True),
        Workload(
            "raw_put", "4 KiB straight to the store, durable, p50", "ms", "overwrites", p50=True
        ),
        Workload("append", "append 1 KiB (open, write, close)", "ops/s", "appends"),
        # One file is three operations: the create (open O_CREAT|O_EXCL, then
        # close), the stat and the unlink.
        Workload("csu1", "create+stat+unlink, 1 thread", "ops/s", "files", per=CSU_OPS),
        Workload("csu8", "create+stat+unlink, 8 threads", "ops/s", "files", per=CSU_OPS),
        Workload("csu8s", "create+stat+unlink, 8 threads, 1 dir", "ops/s", "files", per=CSU_OPS),
        Workload("rename", "rename a directory of N files", "ms", "renames"),
        Workload("small_write", "small files written, 1 thread", "files/s", "files"),
        Workload("small_read_cold", "small files read cold, 4 threads", "files/s", "files"),
        Workload("tar", "tar -xf a tree of small files", "files/s", "files"),
        Workload("raw_safetensors", "safetensors' blocks from the store, cold", "MiB/s"),
        Workload("safetensors_cold", "load safetensors (numpy), cold", "MiB/s"),
        Workload("safetensors_warm", "load safetensors (numpy), warm", "MiB/s"),
        Workload("raw_pickle", "pickle's blocks from the store, cold", "MiB/s"),
        Workload("pickle_cold", "load pickle, cold", "MiB/s"),
        Workload("pickle_warm", "load pickle, warm", "MiB/s"),
    )
}


class TimedOut(RuntimeError):
    """A worker did not finish within its bound plus the grace (one operation never returned)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"timed out after {seconds:.0f} s")
        self.seconds = seconds


def grace(timeout: float) -> float:
    """How long a worker may overrun its bound (to finish the operation under way)."""
    return max(30.0, timeout / 4)


def run_worker(name: str, target: Target, scale: str, env: dict[str, str], timeout: float) -> Done:
    """Run workload `name` in `target` in a child process, bounded by `timeout` seconds.

    The worker starts no operation after the bound and reports what it
    completed; one still blocked in an operation `grace(timeout)` later is
    killed (TimedOut).
    """
    child_env = {**os.environ, **env, "PYTHONPATH": str(REPO_ROOT),
                 "BENCH_DEADLINE": repr(time.time() + timeout)}  # fmt: skip
    hard = timeout + grace(timeout)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.bench_fs", "--worker", name, "--dir", str(target.dir),
             "--scale", scale],
            capture_output=True, text=True, timeout=hard, env=child_env, cwd=REPO_ROOT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise TimedOut(hard) from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"failed: {tail}")
    return Done(**json.loads(proc.stdout.strip().splitlines()[-1]))


def planned(key: str, s: Scale) -> float:
    """The amount workload `key` does when it runs to the end."""
    model = key.startswith(("safetensors", "pickle", "raw_safetensors", "raw_pickle"))
    return {
        "overwrite": s.overwrites, "raw_put": s.overwrites, "append": s.appends, "csu1": s.files,
        "csu8": s.files, "csu8s": s.files, "rename": 1, "tar": s.tree_files,
        "small_write": s.tree_files, "small_read_cold": s.tree_files,
    }.get(key, s.model_mib if model else s.big_mib)  # fmt: skip


def partial_note(w: Workload, done: Done) -> str | None:
    """'partial: 1,800 of 10,000 files in 120 s' when the step ran out of time, else its note."""
    notes = [done.note] if done.note else []
    if done.amount < done.planned:
        notes.insert(0, f"partial: {done.amount:,.0f} of {done.planned:,.0f} {w.noun} "
                     f"in {done.seconds:.0f} s")  # fmt: skip
    return "; ".join(notes) or None


SEQUENTIAL = ("seq_write", "raw_write", "raw_store", "seq_read_cold", "seq_read_warm",
              "overwrite", "raw_put")  # fmt: skip
GROUPS = {
    "seq": SEQUENTIAL,
    "meta": ("append", "csu1", "csu8", "csu8s", "rename"),
    "small": ("small_write", "small_read_cold", "tar"),
    "tar": ("tar",),
    "model": ("raw_safetensors", "safetensors_cold", "safetensors_warm",
              "raw_pickle", "pickle_cold", "pickle_warm"),
}  # fmt: skip
WARM_RUNS = 3
"""Warm reads run this often in a row and report the median run: they come from the page
cache, whose speed varies most between runs on a shared machine."""


def parse_workloads(spec: str | None) -> set[str]:
    """Workload keys (or group names: seq, meta, small, tar, model) of a comma list; all if None."""
    if not spec:
        return set(WORKLOADS)
    keys: set[str] = set()
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        if name in GROUPS:
            keys.update(GROUPS[name])
        elif name in WORKLOADS:
            keys.add(name)
        else:
            raise ValueError(f"unknown workload {name!r}")
    return keys


def store_keys(target: Target) -> set[str]:
    """The keys of the blocks in the target's store now (none for a target without a store)."""
    if target.store_url is None:
        return set()
    from tidefs.replica.blocks import BLOCKS_PREFIX
    from tidefs.replica.store import open_store

    with open_store(target.store_url) as store:
        return set(store.list(BLOCKS_PREFIX))  # not snapshots: they are no file's blocks


def bench_target(
    target: Target,
    scale: str,
    env: dict[str, str],
    log: Callable[[str], None],
    only: set[str] | None = None,
) -> list[Row]:
    """Run every workload (or those in `only`) in `target`; a failed step yields a row with its error."""
    s = SCALES[scale]
    rows: list[Row] = []
    wanted = set(WORKLOADS) if only is None else only

    def step(
        key: str, worker: str, *, record: bool = True, repeat: int = 1,
        extra: dict[str, str] | None = None,
    ) -> bool:  # fmt: skip
        """Run `worker` (`repeat` times in a row: the median run counts) as workload `key`."""
        w = WORKLOADS.get(key)
        record = record and key in wanted
        started = time.monotonic()
        try:
            runs = [run_worker(worker, target, scale, {**env, **(extra or {})}, s.timeout)
                    for _ in range(repeat)]  # fmt: skip
        except TimedOut as e:
            log(f"  {target.name}: {key}: {e}")
            if w is not None and record:
                # Not one operation came back in time: the figure is a bound.
                amount = planned(key, s)
                bound = w.figure(amount, e.seconds)
                worse = "at least" if w.unit == "ms" else "at most"
                why = (f"partial: {worse} this; {amount:,.0f} {w.noun} not done "
                        f"in {e.seconds:.0f} s")  # fmt: skip
                rows.append(Row(target.name, w.label, w.unit, bound, str(e), why))
            return False
        except Exception as e:
            log(f"  {target.name}: {key}: {e}")
            if w is not None and record:
                rows.append(Row(target.name, w.label, w.unit, None, str(e)))
            return False
        if w is not None and repeat > 1:
            runs.sort(key=lambda d: w.of(d) if d.amount else 0.0)
        done = runs[len(runs) // 2]
        # A step that only prepares (making the files to rename) counts in its own noun.
        kind = w if w is not None and worker != "mkfiles" else Workload(worker, worker, "", "files")
        note = partial_note(kind, done)
        if repeat > 1:
            note = "; ".join(n for n in (note, f"median of {repeat} runs") if n)
        if w is not None and record:
            value = w.of(done) if done.amount else None
            error = None if done.amount else f"nothing done in {done.seconds:.0f} s"
            rows.append(Row(target.name, w.label, w.unit, value, error, note))
            shown = "-" if value is None else f"{value:.2f}"
            log(f"  {target.name}: {w.label}: {shown} {w.unit} "
                f"({time.monotonic() - started:.1f} s){f' ({note})' if note else ''}")  # fmt: skip
        elif note:
            log(f"  {target.name}: {worker}: {note}")
        return done.amount > 0

    def cold() -> bool:
        try:
            target.cold()
            return True
        except Exception as e:
            log(f"  {target.name}: making caches cold failed: {e}")
            return False

    def cleanup(*names: str) -> None:
        for n in names:
            p = target.dir / n
            with contextlib.suppress(OSError):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    def blocks_since(before: set[str], planned_mib: float) -> dict[str, str]:
        """The environment of a raw read of the blocks the store gained since `before`."""
        listed = target.root / "blocks.txt"
        listed.write_text("\n".join(sorted(store_keys(target) - before)) + "\n")
        return {"BENCH_BLOCKS": str(listed), "BENCH_PLANNED_MIB": repr(planned_mib)}

    has_store = target.store_url is not None
    if wanted & set(SEQUENTIAL):
        before = store_keys(target)
        if step("seq_write", "seq_write"):
            raw_read = blocks_since(before, s.big_mib) if has_store else {}
            if "raw_write" in wanted and has_store:
                step("raw_write", "raw_write")  # right after the write, under the same load
            if "raw_store" in wanted and has_store and cold():
                step("raw_store", "raw_store", extra=raw_read)
            if "seq_read_cold" in wanted and cold():
                step("seq_read_cold", "seq_read")
            if "seq_read_warm" in wanted:  # right after the cold read: its pages are cached
                step("seq_read_warm", "seq_read", repeat=WARM_RUNS)
            if "overwrite" in wanted:
                step("overwrite", "overwrite")
            if "raw_put" in wanted and has_store:
                step("raw_put", "raw_put")  # right after the overwrites, under the same load
    cleanup("big")
    for key in ("append", "csu1", "csu8", "csu8s"):
        if key in wanted:
            step(key, key)
    cleanup("csu1", "csu8", "csu8s")
    wrote_small = wanted & {"small_write", "small_read_cold"} and step("small_write", "small_write")
    if wrote_small and "small_read_cold" in wanted and cold():
        step("small_read_cold", "small_read")
    cleanup("small")
    if "rename" in wanted and step("rename", "mkfiles", record=False):
        step("rename", "rename")
    cleanup("tree", "moved")
    if "tar" in wanted:
        step("tar", "tar")
    cleanup("src")
    for fmt, name in MODEL_FILES.items():
        keys = [f"raw_{fmt}", f"{fmt}_cold", f"{fmt}_warm"]
        if not wanted & set(keys):
            continue
        try:
            before = store_keys(target)
            # 2 GiB at full size: s3fs writes it at about 50 MiB/s, so it gets 2 bounds.
            copied = run_worker("copy_model", target, scale, {**env, "BENCH_COPY": name},
                                2 * s.timeout)  # fmt: skip
            if copied.amount < copied.planned:
                raise RuntimeError(f"copying the model ran out of time: {copied.amount:,.0f} of "
                                   f"{copied.planned:,.0f} MiB in {copied.seconds:.0f} s")  # fmt: skip
            raw_read = blocks_since(before, s.model_mib) if has_store else {}
        except Exception as e:
            log(f"  {target.name}: copying the model failed: {e}")
            rows += [Row(target.name, WORKLOADS[k].label, "MiB/s", None, str(e))
                     for k in keys if k in wanted and (has_store or not k.startswith("raw"))]  # fmt: skip
        else:
            if keys[0] in wanted and has_store and cold():
                step(keys[0], "raw_store", extra=raw_read)
            if keys[1] in wanted and cold():
                step(keys[1], f"load_{fmt}")
            if keys[2] in wanted:
                step(keys[2], f"load_{fmt}", repeat=WARM_RUNS)
        cleanup(name)
    return rows


def make_inputs(where: Path, scale: Scale, model: bool = True) -> dict[str, str]:
    """Write the source-tree tarball and (with `model`) the synthetic model, once."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = random.Random(2)
    tarball = where / "tree.tar"
    with tarfile.open(tarball, "w") as tar:
        for i in range(scale.tree_files):
            data = rng.randbytes(rng.choice((200, 1000, 4000, 12000, 40000)))
            info = tarfile.TarInfo(f"src/pkg{i % 40}/sub{i % 7}/file{i}.py")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, fileobj=io.BytesIO(data))
    if not model:
        return {"BENCH_TARBALL": str(tarball)}
    model_dir = where / "model"
    model_dir.mkdir()
    gen = np.random.default_rng(3)
    count = max(1, scale.model_mib // scale.tensor_mib)
    side = int((scale.tensor_mib * MIB // 4) ** 0.5)
    rows = scale.tensor_mib * MIB // 4 // side
    tensors = {
        f"layers.{i}.weight": gen.standard_normal((rows, side), dtype=np.float32)
        for i in range(count)
    }
    save_file(tensors, str(model_dir / "model.safetensors"))
    with open(model_dir / "model.pkl", "wb") as f:
        pickle.dump(tensors, f, protocol=5)
    return {"BENCH_TARBALL": str(tarball), "BENCH_MODEL_DIR": str(model_dir)}


@contextlib.contextmanager
def s3_endpoint(kind: str = "moto") -> Iterator[Any]:
    """An S3 server on loopback (moto's, or gofakes3's), with fake credentials in this process's environment."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.harness.s3 import FAKE_AWS_ENV, S3Server

    binary = None
    if kind == "gofakes3":
        binary = REPO_ROOT / ".cache" / "gofakes3" / "bin" / "gofakes3"
        if not binary.exists():
            raise SystemExit("bench fs: gofakes3 is not built: run scripts/fetch-gofakes3")
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(FAKE_AWS_ENV)
    server = S3Server(gofakes3=str(binary) if binary else None)
    try:
        server.start()
        yield server
    finally:
        server.close()
        for k in FAKE_AWS_ENV:
            os.environ.pop(k, None)
        os.environ.update(saved)


def make_target(name: str, server: Any) -> Target:
    if name == "tmpfs":
        return Tmpfs(Path(tempfile.mkdtemp(prefix="tidefs-bench-ref-", dir="/dev/shm")))
    root = Path(tempfile.mkdtemp(prefix=f"tidefs-bench-{name}-"))
    if name == "tidefs-file":
        return TidefsMount(root, name, (root / "store").as_uri())
    if server is None:
        raise RuntimeError("no S3 endpoint")
    if name == "tidefs-s3":
        return TidefsMount(root, name, server.store_url(server.create_bucket()))
    return S3fs(root, server.endpoint, server.create_bucket())


@dataclass(frozen=True)
class Check:
    """One target of the data-path issue: a workload's figure on a tidefs target against a bound.

    The reference is measured in the same run, on the same target (`ref_on`
    "self": the raw store) or on tmpfs. `on` says what the bound applies to:
    "ratio" (the speed ratio to the reference: for latencies the reference's
    over the figure) or "figure" (the figure itself; the reference is then
    shown for scale).
    """

    what: str
    key: str
    ref: str
    ref_on: str
    on: str
    op: str
    bound: float
    s3_bound: float | None = None

    def bound_for(self, target: str) -> float:
        return self.s3_bound if self.s3_bound is not None and target == "tidefs-s3" else self.bound


CHECKS = (
    Check("cold sequential read vs the raw store read of the same blocks", "seq_read_cold",
          "raw_store", "self", "ratio", ">=", 0.9),
    Check("cold safetensors load vs the raw store read of its blocks", "safetensors_cold",
          "raw_safetensors", "self", "ratio", ">=", 0.9),
    Check("cold pickle load vs the raw store read of its blocks", "pickle_cold", "raw_pickle",
          "self", "ratio", ">=", 0.9),
    Check("warm sequential read vs tmpfs", "seq_read_warm", "seq_read_warm", "tmpfs", "ratio",
          ">=", 1.0),
    Check("warm safetensors load vs tmpfs", "safetensors_warm", "safetensors_warm", "tmpfs",
          "ratio", ">=", 1.0),
    Check("warm pickle load vs tmpfs", "pickle_warm", "pickle_warm", "tmpfs", "ratio", ">=", 1.0),
    Check("sequential write + fsync vs the same bytes straight to the store", "seq_write",
          "raw_write", "self", "ratio", ">=", 0.9),
    Check("small files read cold, 4 threads", "small_read_cold", "small_read_cold", "tmpfs",
          "figure", ">=", 2500, s3_bound=1700),
    Check("small files written, 1 thread", "small_write", "small_write", "tmpfs", "figure", ">=",
          700),
    Check("tar -x of small files", "tar", "tar", "tmpfs", "figure", ">=", 700),
    Check("create+stat+unlink, 8 threads, a directory each", "csu8", "csu8", "tmpfs", "figure",
          ">=", 7500),
    Check("create+stat+unlink, 8 threads, one directory", "csu8s", "csu8s", "tmpfs", "figure",
          ">=", 3000),
    Check("create+stat+unlink, 1 thread", "csu1", "csu1", "tmpfs", "figure", ">=", 3000),
    Check("4 KiB pwrite + fsync inside the big file, p50", "overwrite", "raw_put", "self",
          "figure", "<=", 1.0),
    Check("rename of a directory of N files (no regression)", "rename", "rename", "tmpfs",
          "figure", "<=", 10.0),
)  # fmt: skip
"""The targets of the data-path issue that `bench fs` measures, in the issue's order.

On S3 each holds against the same S3 server's raw figures. Not here: the
metadata lag and block copy ratios (`bench replicate`), pjdfstest and the
semantics (the test suite)."""


def targets_met(rows: list[Row]) -> list[dict[str, Any]]:
    """Each of CHECKS on each tidefs target: figure, reference, ratio, bound, met.

    `value` is what the bound applies to (the ratio or the figure); `met` is
    None when a figure it needs is missing or failed. A check that uses a
    partial figure (a step that ran out of time) says so.
    """
    by = {(r.target, r.workload): r for r in rows}
    out = []
    for t in ("tidefs-file", "tidefs-s3"):
        if not any(r.target == t for r in rows):
            continue
        for c in CHECKS:
            w, ref_w = WORKLOADS[c.key], WORKLOADS[c.ref]
            row = by.get((t, w.label))
            if row is None:
                continue  # not run (`--workloads`); a failed step has a row and reads n/a
            ref_row = by.get((t if c.ref_on == "self" else c.ref_on, ref_w.label))
            figure = row.value
            reference = None if ref_row is None else ref_row.value
            ratio = None
            if figure and reference:
                ratio = reference / figure if w.unit == "ms" else figure / reference
            value = ratio if c.on == "ratio" else figure
            bound = c.bound_for(t)
            met = None if value is None else (value >= bound if c.op == ">=" else value <= bound)
            partial = any(r is not None and (r.note or "").startswith("partial")
                          for r in (row, ref_row))  # fmt: skip
            ref_name = ref_w.label if c.ref_on == "self" else c.ref_on
            out.append({
                "target": t, "check": c.what, "workload": w.label, "unit": w.unit,
                "figure": figure, "reference": ref_name, "reference_figure": reference,
                "ratio": ratio, "on": c.on, "bound": f"{c.op} {bound:g}", "value": value,
                "met": met, "partial": partial,
            })  # fmt: skip
    return out


def _num(x: float | None) -> str:
    """A figure as the report prints it: '-' when missing, 3 significant digits or more."""
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _verdict(c: dict[str, Any]) -> str:
    verdict = "n/a" if c["met"] is None else "met" if c["met"] else "NOT met"
    return verdict + (" (on a partial figure)" if c["partial"] else "")


def _target_words(c: dict[str, Any]) -> str:
    """The bound as a reader says it: 'ratio >= 0.9' or '>= 700 files/s'."""
    op, bound = c["bound"].split()
    return f"ratio {op} {bound}" if c["on"] == "ratio" else f"{op} {float(bound):,g} {c['unit']}"


def format_check(c: dict[str, Any]) -> str:
    """One line of the target check: the figure, the reference, the ratio and the verdict."""
    return (f"target {c['target']}: {c['check']}: {_num(c['figure'])} {c['unit']}; "
            f"{c['reference']} {_num(c['reference_figure'])}; ratio {_num(c['ratio'])}; "
            f"target {_target_words(c)}: {_verdict(c)}")  # fmt: skip


def markdown(checks: list[dict[str, Any]]) -> str:
    """The target check as a plain Markdown table, one row per target and workload."""
    lines = ["| store | workload | tidefs | reference | ratio | target | met |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in checks:
        store = {"tidefs-file": "directory", "tidefs-s3": "S3"}[c["target"]]
        lines.append(
            f"| {store} | {c['check']} | {_num(c['figure'])} {c['unit']} | {c['reference']}: "
            f"{_num(c['reference_figure'])} | {_num(c['ratio'])} | {_target_words(c)} | "
            f"{_verdict(c)} |"
        )
    return "\n".join(lines)


def table(rows: list[Row], names: list[str]) -> str:
    """Absolute figures per target, and each target's speed ratio to tmpfs."""
    by = {(r.target, r.workload): r for r in rows}
    lines = []
    head = f"{'workload':<42} {'unit':<8}" + "".join(f" {n:>12}" for n in names)
    head += "".join(f" {n + '/tmpfs':>18}" for n in names if n != "tmpfs")
    lines.append(head)
    for w in WORKLOADS.values():
        if not any((n, w.label) in by for n in names):
            continue
        line = f"{w.label:<42} {w.unit:<8}"
        for n in names:
            r = by.get((n, w.label))
            cell = "-" if r is None else "FAILED" if r.value is None else f"{r.value:.2f}"
            if r is not None and r.note and r.value is not None:
                cell += "*"
            line += f" {cell:>12}"
        ref = by.get(("tmpfs", w.label))
        for n in names:
            if n == "tmpfs":
                continue
            r = by.get((n, w.label))
            cell = "-"
            if r and r.value and ref and ref.value:
                cell = f"{(ref.value / r.value if w.unit == 'ms' else r.value / ref.value):.3f}"
            line += f" {cell:>18}"
        lines.append(line)
    notes = [f"* {r.target}, {r.workload}: {r.note}" for r in rows
             if r.note and r.value is not None and r.target in names]  # fmt: skip
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench fs", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="scale", const="quick",
                      help="a smoke-sized run (a few minutes)")  # fmt: skip
    size.add_argument("--tiny", action="store_const", dest="scale", const="tiny",
                      help="the smallest run, for tests")  # fmt: skip
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS)}")  # fmt: skip
    p.add_argument("--workloads", metavar="LIST",
                   help="comma-separated workloads or groups to run (default: all); groups: "
                   + ", ".join(f"{g} ({','.join(k)})" for g, k in GROUPS.items()))  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON report to FILE")
    p.add_argument("--markdown", action="store_true",
                   help="also print the target check as a Markdown table (docs/BENCHMARKS.md)")  # fmt: skip
    p.add_argument("--step-timeout", type=float, metavar="SECONDS",
                   help="bound of each workload (default: 900 s at full size); a step that "
                   "reaches it reports a partial figure. s3fs needs over an hour unbounded; "
                   "60 keeps a full run with every target near 40 minutes")  # fmt: skip
    p.add_argument(
        "--s3-server",
        choices=("moto", "gofakes3"),
        default="moto",
        help="the S3 endpoint of the tidefs-s3 and s3fs targets: moto's server "
        "(the tests' endpoint; ~4 ms of its own CPU per request) or gofakes3 "
        "(Go, in memory; build it with scripts/fetch-gofakes3)",
    )
    p.add_argument("--no-drop-caches", action="store_true",
                   help="leave the kernel's page cache alone (cold runs then only remount)")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--scale", default="full", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    scale = args.scale or "full"
    if args.worker:
        return worker_main(args.worker, args.dir, scale)
    if args.step_timeout:
        SCALES[scale] = replace(SCALES[scale], timeout=args.step_timeout)
    try:
        only = parse_workloads(args.workloads)
    except ValueError as e:
        p.error(str(e))
    names = [n for n in args.targets.split(",") if n]
    unknown = set(names) - set(TARGETS)
    if unknown or not names:
        p.error(f"unknown targets {sorted(unknown)}; choose from {','.join(TARGETS)}")
    # A run stopped with SIGTERM (or ^C) still unmounts and stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    global DROP_CACHES
    DROP_CACHES = not args.no_drop_caches
    if "tmpfs" not in names:
        names.insert(0, "tmpfs")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    rows: list[Row] = []
    inputs = Path(tempfile.mkdtemp(prefix="tidefs-bench-inputs-"))
    try:
        log(f"bench fs: scale {scale}; preparing inputs")
        env = make_inputs(inputs, SCALES[scale], model=bool(only & set(GROUPS["model"])))
        needs_s3 = any(n in ("tidefs-s3", "s3fs") for n in names)
        if needs_s3:
            log(f"bench fs: S3 endpoint: {args.s3_server}")
        with s3_endpoint(args.s3_server) if needs_s3 else contextlib.nullcontext() as server:
            for name in names:
                log(f"bench fs: target {name}")
                try:
                    target = make_target(name, server)
                    target.start()
                except Exception as e:
                    log(f"  {name}: could not start: {e}")
                    rows += [Row(name, w.label, w.unit, None, f"could not start: {e}")
                             for w in WORKLOADS.values()]  # fmt: skip
                    continue
                try:
                    tenv = dict(env)
                    if target.store_url:
                        tenv["BENCH_STORE_URL"] = target.store_url
                    rows += bench_target(target, scale, tenv, log, only)
                finally:
                    target.stop()
    finally:
        shutil.rmtree(inputs, ignore_errors=True)

    checks = targets_met(rows)
    report = json.dumps(
        {
            "scale": asdict(SCALES[scale]),
            "s3_server": args.s3_server if needs_s3 else None,
            "rows": [asdict(r) for r in rows],
            "targets": checks,
        },
        indent=2,
    )
    if args.json_out:
        Path(args.json_out).write_text(report + "\n")
    if args.json:
        print(report)
        return 0
    print()
    print(table(rows, names))
    print()
    for c in checks:
        print(format_check(c))
    if args.markdown:
        print()
        print(markdown(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
