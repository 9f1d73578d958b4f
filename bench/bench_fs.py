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
  cache dropped) and warm (read again at once); on tidefs targets also the same
  blocks read straight from the block store (`BlockStore.get_block`, cold), the
  reference of the cold-read target;
- 4 KiB overwrites at random offsets in that file, each `pwrite` + `fsync`
  (latency per overwrite); on tidefs targets also the reference of that
  figure, measured right after it: 4 KiB made durable straight in the store's
  medium (a boto3 `put_object` on S3; `pwrite` + `fsync` of a local file
  beside a directory store);
- append 1 KiB x 1000: open with O_APPEND, write 1 KiB, close, 1000 times
  (each close makes the bytes visible to other regions);
- create + stat + unlink 10,000 files: 1 thread; 8 threads with a directory
  each (the kernel serialises creates and unlinks inside one directory); and
  8 threads in one directory;
- rename of a directory holding 10,000 files (latency of the rename);
- `tar -xf` of a synthetic source tree (a few thousand small files in folders);
- model loading: a synthetic 2 GiB safetensors file loaded with
  `safetensors.numpy.load_file`, and the same tensors in a pickle, single
  thread, cold and warm.

Every workload runs in a child process with a time bound (`--step-timeout`):
at the bound it starts no further operation and its figure is the rate over
the operations it completed, marked partial ("partial: 1,800 of 10,000 files
in 120 s"); a single operation that never returns (loading a model, one
rename) is killed a grace period later and reported as a bound ("at most" /
"at least"). A step that fails is reported as such and the run goes on.
`--workloads` runs a subset (e.g. `seq` or `seq_write,seq_read_cold`). Figures are printed
as absolute values and as speed ratios to tmpfs (1.0 = as fast as tmpfs; for
latencies the ratio is tmpfs' latency over the target's). Cold runs drop the
kernel's page cache (`/proc/sys/vm/drop_caches`, as root; skipped otherwise).

    python -m bench fs [-- --quick --targets tmpfs,tidefs-file --workloads seq --json]
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
    tree_files: int = 3000
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


def _seq_write(d: Path, s: Scale) -> Done:
    block = random.Random(0).randbytes(MIB)
    written = 0
    started = time.perf_counter()
    fd = os.open(d / "big", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    for _ in _in_time(range(s.big_mib)):
        os.write(fd, block)
        written += 1
    os.fsync(fd)
    os.close(fd)
    return Done(written, time.perf_counter() - started, s.big_mib)


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
    done = 0
    started = time.perf_counter()
    for off in _in_time(offsets):
        os.pwrite(fd, page, off)
        os.fsync(fd)
        done += 1
    return Done(done, time.perf_counter() - started, len(offsets))


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
    errors: list[BaseException] = []
    done = [0] * threads

    def work(t: int) -> None:
        try:
            for i in _in_time(range(t, s.files, threads)):
                p = dirs[t] / f"f{i}"
                os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
                os.stat(p)
                os.unlink(p)
                done[t] += 1
        except BaseException as e:
            errors.append(e)

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
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


def _copy_model(d: Path, s: Scale) -> Done:
    """Copy the model files into the target (not a figure; bounded like a workload)."""
    deadline = _deadline()
    copied = planned = 0
    started = time.perf_counter()
    for name in ("model.safetensors", "model.pkl"):
        src = Path(os.environ["BENCH_MODEL_DIR"]) / name
        planned += src.stat().st_size
        with open(src, "rb") as fin, open(d / name, "wb") as fout:
            while time.time() < deadline and (chunk := fin.read(MIB)):
                fout.write(chunk)
                copied += len(chunk)
    return Done(copied / MIB, time.perf_counter() - started, planned / MIB)


def _raw_store(d: Path, s: Scale) -> Done:
    """Read every block of the store (holding only the big file's blocks) with get_block."""
    from tidefs.replica.store import open_store

    store = open_store(os.environ["BENCH_STORE_URL"])
    total = 0
    started = time.perf_counter()
    for key in _in_time(list(store.list())):
        total += len(store.get_block(key))
    elapsed = time.perf_counter() - started
    store.close()
    return Done(total / MIB, elapsed, s.big_mib)


def _raw_put(d: Path, s: Scale) -> Done:
    """Write 4 KiB pages straight to the target's store medium: the overwrite's reference.

    On S3, a boto3 `put_object` of a 4 KiB object (a fresh key each time, as
    every overwrite makes a new block) with boto3's default settings but for
    the `Expect: 100-continue` handshake, which tidefs' store leaves out of
    small puts too, so that the difference between the two figures is what
    the mount adds; on a directory store, `pwrite` + `fsync` of 4 KiB in a
    file beside the store. An overwrite through the mount cannot be faster
    than this: it also appends to the log and waits for the fold.
    """
    from urllib.parse import parse_qs, urlsplit

    from tidefs.replica.store import no_expect_for_small_body

    url = urlsplit(os.environ["BENCH_STORE_URL"])
    rng = random.Random(4)
    page = rng.randbytes(4096)
    done = 0
    if url.scheme == "s3":
        import boto3

        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        client = boto3.session.Session().client(
            "s3", endpoint_url=query.get("endpoint"), region_name=query.get("region")
        )
        # Small puts without boto3's Expect: 100-continue round trip, as tidefs sends them.
        client.meta.events.register_last("before-call.s3", no_expect_for_small_body)
        bucket, prefix = url.netloc, url.path.strip("/")
        client.put_object(Bucket=bucket, Key=f"{prefix}-raw/warm-up", Body=page)  # connect
        started = time.perf_counter()
        for i in _in_time(range(s.overwrites)):
            client.put_object(Bucket=bucket, Key=f"{prefix}-raw/{i}", Body=page)
            done += 1
        elapsed = time.perf_counter() - started
        client.close()
        return Done(done, elapsed, s.overwrites)
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

    def figure(self, amount: float, seconds: float) -> float:
        if self.unit == "ms":
            return seconds / amount * 1000
        return amount * self.per / seconds


WORKLOADS = {
    w.key: w
    for w in (
        Workload("seq_write", "sequential write", "MiB/s"),
        Workload("seq_read_cold", "sequential read, cold", "MiB/s"),
        Workload("raw_store", "same blocks from the store, cold", "MiB/s"),
        Workload("seq_read_warm", "sequential read, warm", "MiB/s"),
        Workload("overwrite", "4 KiB overwrite + fsync", "ms", "overwrites"),
        Workload("raw_put", "4 KiB straight to the store, durable", "ms", "overwrites"),
        Workload("append", "append 1 KiB (open, write, close)", "ops/s", "appends"),
        # One file is three operations: the create (open O_CREAT|O_EXCL, then
        # close), the stat and the unlink.
        Workload("csu1", "create+stat+unlink, 1 thread", "ops/s", "files", per=CSU_OPS),
        Workload("csu8", "create+stat+unlink, 8 threads", "ops/s", "files", per=CSU_OPS),
        Workload("csu8s", "create+stat+unlink, 8 threads, 1 dir", "ops/s", "files", per=CSU_OPS),
        Workload("rename", "rename a directory of N files", "ms", "renames"),
        Workload("tar", "tar -xf a source tree", "files/s", "files"),
        Workload("safetensors_cold", "load safetensors (numpy), cold", "MiB/s"),
        Workload("safetensors_warm", "load safetensors (numpy), warm", "MiB/s"),
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
    return {
        "overwrite": s.overwrites, "raw_put": s.overwrites, "append": s.appends, "csu1": s.files, "csu8": s.files,
        "csu8s": s.files, "rename": 1, "tar": s.tree_files,
    }.get(key, s.model_mib if key.startswith(("safetensors", "pickle")) else s.big_mib)  # fmt: skip


def partial_note(w: Workload, done: Done) -> str | None:
    """'partial: 1,800 of 10,000 files in 120 s' when the step ran out of time, else its note."""
    notes = [done.note] if done.note else []
    if done.amount < done.planned:
        notes.insert(0, f"partial: {done.amount:,.0f} of {done.planned:,.0f} {w.noun} "
                     f"in {done.seconds:.0f} s")  # fmt: skip
    return "; ".join(notes) or None


SEQUENTIAL = ("seq_write", "raw_store", "seq_read_cold", "seq_read_warm", "overwrite", "raw_put")
GROUPS = {
    "seq": SEQUENTIAL,
    "meta": ("append", "csu1", "csu8", "csu8s", "rename"),
    "tar": ("tar",),
    "model": ("safetensors_cold", "safetensors_warm", "pickle_cold", "pickle_warm"),
}


def parse_workloads(spec: str | None) -> set[str]:
    """Workload keys (or group names: seq, meta, tar, model) of a comma list; all if None."""
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

    def step(key: str, worker: str, *, record: bool = True) -> bool:
        w = WORKLOADS.get(key)
        record = record and key in wanted
        started = time.monotonic()
        try:
            done = run_worker(worker, target, scale, env, s.timeout)
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
        # A step that only prepares (making the files to rename) counts in its own noun.
        kind = w if w is not None and worker != "mkfiles" else Workload(worker, worker, "", "files")
        note = partial_note(kind, done)
        if w is not None and record:
            value = w.figure(done.amount, done.seconds) if done.amount else None
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

    if wanted & set(SEQUENTIAL) and step("seq_write", "seq_write"):
        if "raw_store" in wanted and target.store_url is not None and cold():
            step("raw_store", "raw_store")
        if "seq_read_cold" in wanted and cold():
            step("seq_read_cold", "seq_read")
        if "seq_read_warm" in wanted:
            step("seq_read_warm", "seq_read")  # right after the cold read: its pages are cached
        if "overwrite" in wanted:
            step("overwrite", "overwrite")
        if "raw_put" in wanted and target.store_url is not None:
            step("raw_put", "raw_put")  # right after the overwrites, under the same load
    cleanup("big")
    for key in ("append", "csu1", "csu8", "csu8s"):
        if key in wanted:
            step(key, key)
    cleanup("csu1", "csu8", "csu8s")
    if "rename" in wanted and step("rename", "mkfiles", record=False):
        step("rename", "rename")
    cleanup("tree", "moved")
    if "tar" in wanted:
        step("tar", "tar")
    cleanup("src")
    if not wanted & set(GROUPS["model"]):
        return rows
    try:
        # 4 GiB at full size: s3fs writes it at about 50 MiB/s, so it gets 4 bounds.
        copied = run_worker("copy_model", target, scale, env, 4 * s.timeout)
        if copied.amount < copied.planned:
            raise RuntimeError(f"copying the model ran out of time: {copied.amount:,.0f} of "
                               f"{copied.planned:,.0f} MiB in {copied.seconds:.0f} s")  # fmt: skip
    except Exception as e:
        log(f"  {target.name}: copying the model failed: {e}")
        for key in ("safetensors_cold", "safetensors_warm", "pickle_cold", "pickle_warm"):
            if key in wanted:
                rows.append(Row(target.name, WORKLOADS[key].label, "MiB/s", None, str(e)))
    else:
        for fmt in ("safetensors", "pickle"):
            if f"{fmt}_cold" in wanted and cold():
                step(f"{fmt}_cold", f"load_{fmt}")
            if f"{fmt}_warm" in wanted:
                step(f"{fmt}_warm", f"load_{fmt}")
    cleanup("model.safetensors", "model.pkl")
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


def targets_met(rows: list[Row]) -> list[dict[str, Any]]:
    """The issue's performance targets, checked on the tidefs targets.

    A check that uses a partial figure (a step that ran out of time) says so.
    """
    by = {(r.target, r.workload): r for r in rows}
    # (what, workload, reference: "tmpfs", "self" (another workload of the target), None,
    #  or "per-file" (the figure divided by the operations per file), reference workload,
    #  op, bound)
    specs: list[tuple[str, str, str | None, str, str, float]] = [
        ("warm sequential read / tmpfs", "seq_read_warm", "tmpfs", "seq_read_warm", ">=", 0.9),
        ("warm safetensors load / tmpfs", "safetensors_warm", "tmpfs", "safetensors_warm", ">=",
         0.9),
        ("warm pickle load / tmpfs", "pickle_warm", "tmpfs", "pickle_warm", ">=", 0.9),
        ("cold sequential read / raw store", "seq_read_cold", "self", "raw_store", ">=", 0.5),
        ("4 KiB overwrite in the big file (ms)", "overwrite", None, "", "<=", 10.0),
        ("rename a directory of N files (ms)", "rename", None, "", "<=", 10.0),
        ("create+stat+unlink, 8 threads (ops/s)", "csu8", None, "", ">=", 1500),
        # The stricter reading of the same target: 1,500 whole files a second.
        ("create+stat+unlink, 8 threads (files/s)", "csu8", "per-file", "", ">=", 1500),
    ]  # fmt: skip
    out = []
    for t in ("tidefs-file", "tidefs-s3"):
        for what, key, ref, ref_key, op, bound in specs:
            if key == "csu8" and t != "tidefs-file":
                continue  # the target is on the embedded journal
            used = [by.get((t, WORKLOADS[key].label))]
            if ref is not None and ref != "per-file":
                used.append(by.get((t if ref == "self" else ref, WORKLOADS[ref_key].label)))
            values = [None if r is None else r.value for r in used]
            value: float | None = None
            if all(v is not None for v in values):
                value = values[0] if len(values) == 1 else (values[0] or 0) / (values[1] or 1)
                if ref == "per-file" and value is not None:
                    value /= WORKLOADS[key].per
            met = None if value is None else (value >= bound if op == ">=" else value <= bound)
            partial = any(r is not None and (r.note or "").startswith("partial") for r in used)
            out.append({"target": t, "check": what, "value": value, "bound": f"{op} {bound:g}",
                        "met": met, "partial": partial})  # fmt: skip
    return out


def table(rows: list[Row], names: list[str]) -> str:
    """Absolute figures per target, and each target's speed ratio to tmpfs."""
    by = {(r.target, r.workload): r for r in rows}
    lines = []
    head = f"{'workload':<36} {'unit':<8}" + "".join(f" {n:>12}" for n in names)
    head += "".join(f" {n + '/tmpfs':>18}" for n in names if n != "tmpfs")
    lines.append(head)
    for w in WORKLOADS.values():
        if not any((n, w.label) in by for n in names):
            continue
        line = f"{w.label:<36} {w.unit:<8}"
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
        if c["target"] not in names:
            continue
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        verdict = "n/a" if c["met"] is None else "met" if c["met"] else "NOT met"
        if c["partial"]:
            verdict += " (on a partial figure)"
        print(f"target {c['target']}: {c['check']} = {value} ({c['bound']}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
