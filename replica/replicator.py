"""The block replicator: copy every live block of a volume into this region's store.

A region reads a block from its own store when it can and falls back to the
block's home region when it cannot (`tidefs.replica.fetch`); the replicator is
what makes the fallback rare. It follows the volume's log like the fold does,
and for every slice a `CommitSlice` or `CompactChunk` records it queues the
slice's blocks, then copies each one that is missing here from the home region
(or any region that has a good copy).

Why follow the log rather than scan the state: the log says *what is new* in
order, so the work is proportional to what was written, and the position in
the log is a compact, exact progress mark. The state answers the other
question, *is this block still wanted*: just before a copy, the replicator
looks the slice up in a `State` (the mount's live one, or one it folds itself)
and skips blocks whose file was deleted, truncated below them, or compacted
into another slice. A copy is only attempted once that state has applied the
record that queued it, so a lagging fold never makes a new slice look dead.
A block deleted *during* its copy is simply left behind for gc: blocks are
immutable (invariant 4), so a stray copy is garbage, never a wrong byte.
(After a point-in-time replay brings old slices back, their skipped blocks are
read through the fallback path, which is slower, never incorrect.)

A replicator that starts without progress beside a state that has already
folded part of the log (a mount's, a region started from a snapshot) does not
read that history: it queues the live slices the state names and follows the
log from the state's offset on. The history would name every slice ever
deleted too, and a trimmed log no longer holds all of it.

While the volume has no region but this one, there is nothing to copy: the
fold accepts only slices whose home is a region of the volume, and regions
are only ever added. The replicator then reads no record at all (reading and
decoding every command a busy mount writes cost it ~15% of that mount's CPU)
and moves its position along with the state's applied offset instead; once
the state shows a second region it reads the log again from there, starting
with the `AddRegion` record.

Progress lives in a small RocksDB of the replicator's own (`progress_dir`):
the last log offset it has read, the regions' store URLs it learned from the
log, and the pending set, one key per block. New pending blocks and the new
log position are written in one batch, and a block leaves the set when its
copy is done, so a restart (or a crash) resumes where it stopped; the blocks
that were in flight are checked again, and one already present locally is not
copied twice. This database is deliberately not the fold's state: the state
must stay a pure fold of the log (invariant 1), and replication progress is a
region-local fact.

Copies run on a pool of `concurrency` threads. Each copy checks liveness,
asks whether the block is already local (a fallback read may have written it
back), takes its bytes from an optional token bucket (`bandwidth_limit`,
bytes/s of cross-region reads), fetches it from another region, which verifies
the checksum (a corrupt copy is skipped in favour of another region's), and
puts it locally. A failure (a store down, every copy corrupt) leaves the block
pending and retries it with exponential backoff, without blocking the others.
Every store call is bounded by the fetcher's timeout, so a hung store delays,
never hangs, the replicator.

The backlog (blocks, bytes, age of the oldest pending block by its log append
time) is the replicator's main figure: `tidefs status` and the metrics report
it, and `wait_idle` is the barrier tests and `tidefs replicate --once` use.

`run_replicator` is the stand-alone process (`tidefs replicate`): it folds its
own State in `state_dir/state` to decide liveness and keeps its progress in
`state_dir/progress`; a mount runs the same Replicator on its live State via
`start_for_mount`.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import queue
import random
import signal
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, cast

from rocksdict import Options, Rdict, ReadOptions, WriteBatch, WriteOptions

from tidefs import private, telemetry
from tidefs.journal import codec, features
from tidefs.journal.commands import (
    AddRegion,
    CommitSlice,
    CompactChunk,
    CreateVolume,
    Envelope,
    SliceRef,
)
from tidefs.journal.log import JournalError, Log, Record, redact_url
from tidefs.replica.blocks import block_key
from tidefs.replica.fetch import (
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_RETRY_INTERVAL_S,
    BlockFetcher,
    DeferredStore,
    blocks_needed,
)
from tidefs.replica.state import State
from tidefs.replica.store import BlockStore, CorruptBlockError, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8
"""Blocks copied at once by default."""

DEFAULT_RETRY_BASE_S = 0.2
"""First retry delay of a failed copy; it doubles on every further failure."""

DEFAULT_RETRY_MAX_S = 8.0
"""Longest delay between two tries of one block: after a store outage heals, the
backlog is copied within this much time, while a store that stays down costs one
try per block this often."""

STATE_POLL_S = 0.002
"""How often the replicator looks again when its next block waits for the fold."""

LOG_POLL_BUSY_S = 0.05
"""Least time between two log reads while copies are running (a Kafka read costs an RPC)."""

ALONE_POLL_S = 0.05
"""How often a replicator with no other region moves its position to the state's."""

STATE_SUBDIR = "state"
PROGRESS_SUBDIR = "progress"

_FORMAT_KEY = b"\x00format"
_POSITION_KEY = b"\x00position"
_REGION_PREFIX = b"r"
_PENDING_PREFIX = b"p"
_FORMAT = 1
_ENTRY = struct.Struct(">qqQQQQQII")
_PKEY = struct.Struct(">QI")
_U63 = 1 << 63
_ANY_CHUNK = (1 << 64) - 1
"""The chunk of a block queued from an append: the fold, not the command, decides where it lands."""
_SEED_BATCH = 10_000


class ReplicatorError(Exception):
    """The replicator cannot run: its progress directory, its volume or its region is wrong."""


@dataclass(frozen=True, slots=True)
class Backlog:
    """Blocks not yet copied here: how many, their bytes, and how long ago the oldest was committed."""

    blocks: int
    bytes: int
    oldest_age_s: float


@dataclass(frozen=True, slots=True)
class ReplicatorStats:
    """What the replicator did since it was made (counters are not persisted)."""

    blocks_copied: int
    bytes_copied: int
    blocks_present: int
    """Blocks found already local when their turn came (written back by a read, or a copy
    that finished just before a crash): checked, not copied."""
    blocks_skipped: int
    """Blocks no longer needed when their turn came: deleted, truncated or compacted away."""
    retries: int
    """Failed copy attempts, each retried later with backoff."""
    corrupt_copies: int
    """Copies in other regions that failed verification and were passed over."""
    log_position: int
    """The last log offset read (-1 before the first)."""
    error: str | None
    """Why the replicator stopped reading the log (an undecodable record), or None."""


@dataclass(frozen=True, slots=True)
class BlockFailure:
    """A block whose copy keeps failing: its key, tries so far, the last error, the next try."""

    key: str
    attempts: int
    error: str
    next_try_in_s: float


@dataclass(frozen=True, slots=True)
class PendingBlock:
    """One block to copy: block `index` of `slice`, recorded at `log_offset` for (inode, chunk)."""

    slice: SliceRef
    index: int
    inode: int
    chunk: int
    log_offset: int
    committed_ns: int
    """The log append time of the record that queued it: the backlog's age is measured from it."""

    @property
    def key(self) -> str:
        """The store key of the block."""
        return block_key(self.slice.slice_id, self.index)

    @property
    def size(self) -> int:
        """The payload bytes of the block as committed (the last block may be short)."""
        bs = self.slice.block_size
        return max(0, min(bs, self.slice.length - self.index * bs))

    def progress_key(self) -> bytes:
        return _PENDING_PREFIX + _PKEY.pack(self.slice.slice_id, self.index)

    def encode(self) -> bytes:
        s = self.slice
        head = _ENTRY.pack(
            self.log_offset,
            self.committed_ns,
            self.inode,
            self.chunk,
            s.slice_id,
            s.offset,
            s.length,
            s.block_size,
            self.index,
        )
        return head + s.home.encode()

    @classmethod
    def decode(cls, raw: bytes) -> PendingBlock:
        off, ts, ino, chunk, sid, soff, length, bs, index = _ENTRY.unpack_from(raw)
        home = bytes(raw[_ENTRY.size :]).decode()
        return cls(SliceRef(sid, soff, length, bs, home), index, ino, chunk, off, ts)


class TokenBucket:
    """A bytes-per-second limit shared by the copy threads.

    Taking more than is available leaves a debt that later takers wait out,
    so a block larger than the burst still passes and the long-run rate
    holds: each taker sleeps until the bucket would be back at zero.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"bandwidth limit must be positive bytes/s, not {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, n: int, stop: threading.Event | None = None) -> bool:
        """Take `n` bytes, sleeping as long as the rate requires; False if `stop` was set meanwhile."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait <= 0:
            return True
        if stop is None:
            time.sleep(wait)
            return True
        return not stop.wait(wait)


class _Outcome(Enum):
    COPIED = "copied"
    PRESENT = "present"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class _Done:
    pkey: bytes
    entry: PendingBlock
    outcome: _Outcome
    nbytes: int = 0
    error: BaseException | None = None


class _Progress:
    """The replicator's own RocksDB: log position, learned regions, pending blocks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            private.makedirs(path)
            opts = Options(raw_mode=True)
            opts.create_if_missing(True)
            self._db = Rdict(str(path), opts)
        except Exception as exc:
            raise ReplicatorError(
                f"cannot open the replicator progress at {path} "
                f"(another replicator may be using it): {exc}"
            ) from exc
        self._wopts = WriteOptions()
        # Not fsynced: losing the last batches only rewinds the position; the
        # blocks they queued are queued again and found present.
        self._wopts.sync = False
        raw = self._db.get(_FORMAT_KEY)
        if raw is None:
            self._db.put(_FORMAT_KEY, _FORMAT.to_bytes(4, "big"), self._wopts)
        elif int.from_bytes(raw, "big") != _FORMAT:
            fmt = int.from_bytes(raw, "big")
            self._db.close()
            raise ReplicatorError(
                f"replicator progress at {path} has format {fmt}, not {_FORMAT}: remove it "
                "(the replicator then re-reads the log and skips blocks already present)"
            )

    @property
    def fresh(self) -> bool:
        """Whether no position was ever recorded (a new progress directory)."""
        return self._db.get(_POSITION_KEY) is None

    def position(self) -> int:
        raw = self._db.get(_POSITION_KEY)
        return -1 if raw is None else int.from_bytes(raw, "big") - 1

    def regions(self) -> dict[str, str]:
        return {
            bytes(k[len(_REGION_PREFIX) :]).decode(): bytes(v).decode()
            for k, v in self._scan(_REGION_PREFIX)
        }

    def pending(self) -> list[PendingBlock]:
        return [PendingBlock.decode(v) for _k, v in self._scan(_PENDING_PREFIX)]

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        ro = ReadOptions()
        ro.set_iterate_upper_bound(end)
        items = cast(Iterator[tuple[bytes, bytes]], self._db.items(from_key=prefix, read_opt=ro))
        for key, value in items:
            if key >= end:
                break
            yield key, value
        del ro

    def commit(self, position: int, regions: Mapping[str, str], added: list[PendingBlock]) -> None:
        """Record newly read records: their pending blocks, learned regions and the position, at once."""
        wb = WriteBatch(raw_mode=True)
        for entry in added:
            wb.put(entry.progress_key(), entry.encode())
        for name, url in regions.items():
            wb.put(_REGION_PREFIX + name.encode(), url.encode())
        wb.put(_POSITION_KEY, (position + 1).to_bytes(8, "big"))
        self._db.write(wb, self._wopts)

    def add(self, added: list[PendingBlock]) -> None:
        """Record pending blocks without moving the position."""
        wb = WriteBatch(raw_mode=True)
        for entry in added:
            wb.put(entry.progress_key(), entry.encode())
        self._db.write(wb, self._wopts)

    def remove(self, pkeys: list[bytes]) -> None:
        if not pkeys:
            return
        wb = WriteBatch(raw_mode=True)
        for pkey in pkeys:
            wb.delete(pkey)
        self._db.write(wb, self._wopts)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._db.close()


class Replicator:
    """Copies the blocks this region lacks, following one volume's log; see the module doc.

    `stores` maps region names to open stores (borrowed: the caller closes
    them); regions the log names that are not in it are opened here, lazily
    (a `DeferredStore`), and closed by `close`. `state` must be kept folding
    by someone (a mount's Replica, or `run_replicator`'s): it decides which
    blocks are still wanted. `fetcher` may be shared with a mount's data path
    (then region health is shared too); by default the replicator makes its
    own. `bandwidth_limit` caps cross-region reads in bytes/s.

    Either run it in its own thread (`start`/`stop`) or drive it with
    `run_once` (tests); not both at once.
    """

    def __init__(
        self,
        log_: Log,
        local_region: str,
        stores: Mapping[str, BlockStore] | None,
        progress_dir: str | os.PathLike[str],
        *,
        state: State,
        concurrency: int = DEFAULT_CONCURRENCY,
        bandwidth_limit: float | None = None,
        fetcher: BlockFetcher | None = None,
        store_timeout: float = DEFAULT_FETCH_TIMEOUT_S,
        retry_interval: float = DEFAULT_RETRY_INTERVAL_S,
        retry_base: float = DEFAULT_RETRY_BASE_S,
        retry_max: float = DEFAULT_RETRY_MAX_S,
        verify_copy: bool = False,
        batch: int = 1000,
        poll_timeout: float = 0.2,
        store_options: Mapping[str, Any] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if retry_base <= 0 or retry_max < retry_base:
            raise ValueError("retry delays must be positive and retry_max >= retry_base")
        self.log = log_
        self.local_region = local_region
        self.state = state
        self.concurrency = concurrency
        self.verify_copy = verify_copy
        self.batch = batch
        self.poll_timeout = poll_timeout
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.store_timeout = store_timeout
        self._store_options = dict(store_options or {})
        self._bucket = TokenBucket(bandwidth_limit) if bandwidth_limit else None
        self._progress = _Progress(Path(progress_dir))
        self.progress_dir = self._progress.path
        self._owned: list[BlockStore] = []
        self._own_fetcher = fetcher is None
        self._fetcher = fetcher or BlockFetcher(
            local_region,
            stores or {},
            timeout=store_timeout,
            retry_interval=retry_interval,
            write_back=False,
            io_threads=max(4, concurrency),
        )
        if fetcher is not None:
            for name, store in (stores or {}).items():
                if fetcher.store(name) is None:
                    fetcher.set_store(name, store)

        self._lock = threading.Lock()
        self._idle_cond = threading.Condition(self._lock)
        self._position = self._progress.position()
        self._regions: dict[str, str] = {}
        self._pending: dict[bytes, PendingBlock] = {}
        self._pending_bytes = 0
        self._queue: deque[bytes] = deque()
        self._inflight: set[bytes] = set()
        self._retry_heap: list[tuple[float, bytes]] = []
        self._next_try: dict[bytes, float] = {}
        self._attempts: dict[bytes, int] = {}
        self._last_error: dict[bytes, str] = {}
        self._done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._waiting_for_state = False
        self._caught_up_at = -math.inf
        self._wanted = -1
        """The highest log offset a `wait_idle`/`run_once` waits for (see `_follow_state_alone`)."""
        self._last_read = -math.inf
        self._journal_warned = False
        self._error: str | None = None
        self._chunk_size: int | None = None
        self._closed = False
        self._copied = 0
        self._copied_bytes = 0
        self._present = 0
        self._skipped = 0
        self._retries = 0

        known = self._progress.regions()
        vol = state.volume()
        if vol is not None:
            for r in vol.regions:
                known.setdefault(r.name, r.store_url)
        for name, url in known.items():
            self._use_region(name, url)
        entries = sorted(
            self._progress.pending(),
            key=lambda e: (e.log_offset, e.slice.slice_id, e.index),
        )
        self._enqueue(entries)
        if entries:
            log.info(
                "replicator %s resumes at log offset %d with %d pending blocks",
                local_region,
                self._position,
                len(entries),
            )
        if self._progress.fresh or self._log_trimmed_past():
            self._seed_from_state()

    def _log_trimmed_past(self) -> bool:
        """Whether records this replicator has not read were trimmed from the log."""
        try:
            return self._position + 1 < self.log.start()
        except JournalError:
            return False

    def _seed_from_state(self) -> None:
        """Queue every live block of the state, and read the log only after its offset.

        A new replicator beside a state that has folded a long history (a
        mount, a region started from a snapshot, a log trimmed past what this
        replicator read) need not read that history: the state names exactly
        the slices alive now, whereas the log also names every slice deleted
        since. The applied offset is read before the scan, so records the
        scan may already reflect are read again; the same block queued twice
        is one pending entry.
        """
        applied = self.state.applied_offset()
        if applied < 0:
            return  # nothing folded yet: read the log from its start
        now = time.time_ns()
        added: list[PendingBlock] = []
        count = 0
        for ino, chunk, ref in self.state.iter_live_slices():
            if ref.skip:
                # A later part of a split append: queue the slice's blocks from 0, as
                # its command did (what the first part needs is copied once either way).
                ref = SliceRef(ref.slice_id, 0, ref.skip + ref.length, ref.block_size, ref.home)
            if ref.home == self.local_region or not self._plausible(ino, chunk, ref):
                continue
            for index in range(blocks_needed(ref)):
                added.append(PendingBlock(ref, index, ino, chunk, applied, now))
            if len(added) >= _SEED_BATCH:
                self._progress.add(added)
                self._enqueue(added)
                count += len(added)
                added = []
        self._progress.commit(max(applied, self._position), {}, added)
        self._enqueue(added)
        count += len(added)
        with self._lock:
            self._position = max(applied, self._position)
        log.info(
            "replicator %s starts from the state at log offset %d: %d blocks to check",
            self.local_region,
            applied,
            count,
        )

    def _enqueue(self, entries: list[PendingBlock]) -> None:
        """Add blocks to the pending set (in memory; the caller has stored them)."""
        with self._lock:
            for entry in entries:
                pkey = entry.progress_key()
                old = self._pending.get(pkey)
                if old is None:
                    self._queue.append(pkey)
                else:
                    self._pending_bytes -= old.size
                self._pending[pkey] = entry
                self._pending_bytes += entry.size

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Replicator:
        """Run in a background thread until `stop` (idempotent)."""
        if self._closed:
            raise ReplicatorError("the replicator is closed")
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"tidefs-replicator-{self.local_region}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and wait for the copies in flight (each bounded by the store timeout).

        Progress stays in the progress directory; `start` or a new Replicator
        on the same directory carries on. Call `close` to release it.
        """
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._collect(0.0)
        with self._idle_cond:
            self._idle_cond.notify_all()

    def close(self) -> None:
        """Stop, and release the progress database, the stores it opened and its own fetcher."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        self._progress.close()
        if self._own_fetcher:
            self._fetcher.close()
        for store in self._owned:
            with contextlib.suppress(Exception):
                store.close()

    def __enter__(self) -> Replicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pause(self) -> None:
        """Start no new copies until `resume`; the log is still read, so the backlog stays true."""
        self._paused.set()

    def resume(self) -> None:
        """Copy again after `pause`."""
        self._paused.clear()

    @property
    def fetcher(self) -> BlockFetcher:
        """The fetcher the copies read through."""
        return self._fetcher

    # -- figures -----------------------------------------------------------------

    def backlog(self) -> Backlog:
        """Return the blocks still to copy (including those waiting for the fold or a retry)."""
        with self._lock:
            oldest = next(iter(self._pending.values()), None)
            blocks, nbytes = len(self._pending), self._pending_bytes
        age = 0.0
        if oldest is not None:
            age = max(0.0, (time.time_ns() - oldest.committed_ns) / 1e9)
        return Backlog(blocks, nbytes, age)

    def stats(self) -> ReplicatorStats:
        """Return the counters since this Replicator was made."""
        corrupt = self._fetcher.stats().corrupt_copies
        with self._lock:
            return ReplicatorStats(
                blocks_copied=self._copied,
                bytes_copied=self._copied_bytes,
                blocks_present=self._present,
                blocks_skipped=self._skipped,
                retries=self._retries,
                corrupt_copies=corrupt,
                log_position=self._position,
                error=self._error,
            )

    def status_fields(self) -> dict[str, float]:
        """Return the backlog as the fields of a region's status report (`tidefs status`)."""
        b = self.backlog()
        return {
            "backlog_blocks": b.blocks,
            "backlog_bytes": b.bytes,
            "backlog_oldest_s": round(b.oldest_age_s, 3),
        }

    def failures(self) -> list[BlockFailure]:
        """Return the blocks whose last copy attempt failed, most tried first."""
        now = time.monotonic()
        with self._lock:
            out = [
                BlockFailure(
                    self._pending[pkey].key,
                    attempts,
                    self._last_error.get(pkey, ""),
                    max(0.0, self._next_try.get(pkey, now) - now),
                )
                for pkey, attempts in self._attempts.items()
                if pkey in self._pending
            ]
        return sorted(out, key=lambda f: -f.attempts)

    # -- driving -----------------------------------------------------------------

    def run_once(self, timeout: float = 10.0) -> int:
        """Process what the log holds now on the caller's thread; return the blocks copied.

        Returns once the replicator has read up to the head of the log as of
        the call and has no backlog, or when `timeout` passes (blocks still
        failing then stay pending).
        """
        if self._thread is not None:
            raise ReplicatorError("run_once while the replicator thread runs")
        before = self.stats().blocks_copied
        self._drive_until_idle(timeout, self._idle_target())
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._collect(0.0)
        return self.stats().blocks_copied - before

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending and the log is read up to its head at the call.

        Without a running thread, this drives the replicator on the caller's
        thread. Returns False when `timeout` passes first.
        """
        return self._wait_idle(self._idle_target(), timeout)

    def _wait_idle(self, mark: tuple[float, int | None], timeout: float | None) -> bool:
        if self._thread is None:
            return self._drive_until_idle(math.inf if timeout is None else timeout, mark)
        since, target = mark
        self._want(target)
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        with self._idle_cond:
            while not self._is_idle(since, target):
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._idle_cond.wait(min(left, 0.1))
        return True

    def _drive_until_idle(self, timeout: float, mark: tuple[float, int | None]) -> bool:
        since, target = mark
        self._want(target)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._is_idle(since, target):
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._step(min(left, self.poll_timeout))

    def _want(self, target: int | None) -> None:
        if target is not None:
            with self._lock:
                self._wanted = max(self._wanted, target)

    def _idle_target(self) -> tuple[float, int | None]:
        since = time.monotonic()
        try:
            return since, self.log.head() - 1
        except JournalError:
            return since, None

    def _is_idle(self, since: float, target: int | None) -> bool:
        """Caller holds the lock."""
        caught_up = self._caught_up_at >= since or (target is not None and self._position >= target)
        return caught_up and not self._pending

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step(self.poll_timeout)
            except Exception:  # a bug must not silently end replication
                log.exception("replicator step failed; retrying")
                self._stop.wait(1.0)

    # -- one step: collect, dispatch, read -------------------------------------------

    def _step(self, wait: float) -> None:
        """Record finished copies, start ready ones, read the log once; block at most `wait`."""
        self._collect(0.0)
        self._promote_retries()
        self._dispatch()
        busy = bool(self._inflight)
        read = 0
        if not busy:
            block = min(wait, self._next_retry_in())
            if self._waiting_for_state:
                block = min(block, STATE_POLL_S)
            read = self._read_log(block)
        elif time.monotonic() - self._last_read >= LOG_POLL_BUSY_S:
            read = self._read_log(0.0)
        if read:
            self._dispatch()
        elif busy:
            pause = min(wait, self._next_retry_in(), LOG_POLL_BUSY_S)
            if self._waiting_for_state:
                pause = min(pause, STATE_POLL_S)
            self._collect(pause)
        with self._idle_cond:
            self._idle_cond.notify_all()

    def _next_retry_in(self) -> float:
        if not self._retry_heap:
            return math.inf
        return max(0.0, self._retry_heap[0][0] - time.monotonic())

    def _read_log(self, timeout: float) -> int:
        """Read one batch of records and queue the blocks they commit; return how many were read."""
        if self._error is not None:
            self._stop.wait(timeout if math.isfinite(timeout) else self.poll_timeout)
            return 0
        if self._follow_state_alone(timeout):
            return 0
        started = time.monotonic()
        try:
            records = self.log.read(self._position + 1, max_records=self.batch, timeout=timeout)
        except JournalError as exc:
            if not self._journal_warned:
                log.warning(
                    "replicator %s cannot read the log, retrying: %s", self.local_region, exc
                )
                self._journal_warned = True
            self._stop.wait(min(max(timeout, 0.05), 1.0))
            return 0
        self._journal_warned = False
        self._last_read = started
        if not records:
            self._caught_up_at = started
            return 0
        self._take(records)
        return len(records)

    def _follow_state_alone(self, timeout: float) -> bool:
        """Without another region, move the position to the state's and wait; False otherwise.

        The applied offset is read before the volume, so that every record up
        to it was folded while this region was the only one (see module doc).
        """
        if self._pending:
            return False
        applied = self.state.applied_offset()
        vol = self.state.volume()
        if vol is None or [r.name for r in vol.regions] != [self.local_region]:
            return False
        if applied < self._wanted and self._position < self._wanted:
            # A waiter wants more than the fold has applied (it is paused, stopped
            # or behind): read the log to its head, as with other regions, so that
            # being caught up does not depend on the fold.
            return False
        if applied > self._position:
            self._progress.commit(applied, {}, [])
            with self._lock:
                self._position = applied
        self._last_read = time.monotonic()
        self._stop.wait(min(timeout, ALONE_POLL_S))
        return True

    def _take(self, records: list[Record]) -> None:
        added: list[PendingBlock] = []
        learned: dict[str, str] = {}
        last = self._position
        for rec in records:
            try:
                env = codec.decode(rec.payload)
                # A record enabling what this tidefs does not know stops the fold
                # just before it; records after it may use that feature.
                features.check_known(env)
            except codec.CodecError as exc:
                # As the fold does: stop at the record, never guess what it commits.
                self._error = f"record at offset {rec.offset}: {exc}"
                log.error(
                    "replicator %s stopped reading the log: %s", self.local_region, self._error
                )
                break
            self._note(rec, env, added, learned)
            last = rec.offset
        if last == self._position:
            return
        self._progress.commit(last, learned, added)
        for name, url in learned.items():
            self._use_region(name, url)
        self._enqueue(added)
        with self._lock:
            self._position = last

    def _note(
        self, rec: Record, env: Envelope, added: list[PendingBlock], learned: dict[str, str]
    ) -> None:
        cmd = env.command
        if isinstance(cmd, CreateVolume):
            for r in cmd.regions:
                learned[r.name] = r.store_url
        elif isinstance(cmd, AddRegion):
            learned[cmd.region.name] = cmd.region.store_url
        elif isinstance(cmd, CommitSlice | CompactChunk):
            ref = cmd.slice
            if ref.home == self.local_region or not self._plausible(
                cmd.inode, cmd.chunk_index, ref
            ):
                return
            chunk = _ANY_CHUNK if isinstance(cmd, CommitSlice) and cmd.append else cmd.chunk_index
            for index in range(blocks_needed(ref)):
                added.append(
                    PendingBlock(ref, index, cmd.inode, chunk, rec.offset, rec.timestamp_ns)
                )

    def _plausible(self, inode: int, chunk: int, ref: SliceRef) -> bool:
        """Whether the slice could be valid; the fold rejects the others, so they have no blocks to copy."""
        if self._chunk_size is None:
            vol = self.state.volume()
            if vol is not None:
                self._chunk_size = vol.chunk_size
        chunk_size = self._chunk_size or 1 << 40
        return (
            0 < inode < _U63
            and 0 <= chunk < _U63
            and 0 <= ref.slice_id < _U63
            and ref.offset >= 0
            and ref.length > 0
            and ref.offset + ref.length <= chunk_size
            and 0 < ref.block_size < 1 << 32
        )

    def _use_region(self, name: str, url: str) -> None:
        """Make sure the fetcher can read region `name`, opening its store lazily if needed."""
        self._regions[name] = url
        if self._fetcher.store(name) is not None:
            return
        options = {"timeout": self.store_timeout, **self._store_options}
        store = DeferredStore(url, **options)
        self._owned.append(store)
        self._fetcher.set_store(name, store)

    def _promote_retries(self) -> None:
        """Queue the blocks whose retry delay is over, ahead of the others (they are older)."""
        now = time.monotonic()
        with self._lock:
            while self._retry_heap and self._retry_heap[0][0] <= now:
                when, pkey = heapq.heappop(self._retry_heap)
                if self._next_try.get(pkey) != when:
                    continue
                del self._next_try[pkey]
                if pkey in self._pending:
                    self._queue.appendleft(pkey)

    def _dispatch(self) -> int:
        """Start copies of ready blocks, in log order, up to the concurrency."""
        self._waiting_for_state = False
        if self._paused.is_set() or self._closed:
            return 0
        started = 0
        applied: int | None = None
        while self._queue and len(self._inflight) < self.concurrency:
            pkey = self._queue[0]
            entry = self._pending.get(pkey)
            if entry is None or pkey in self._inflight or pkey in self._next_try:
                self._queue.popleft()
                continue
            if applied is None or entry.log_offset > applied:
                applied = self.state.applied_offset()
                if entry.log_offset > applied:
                    # Its record is not folded here yet: liveness cannot be judged.
                    self._waiting_for_state = True
                    break
            self._queue.popleft()
            self._inflight.add(pkey)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.concurrency, thread_name_prefix=f"tidefs-copy-{self.local_region}"
                )
            self._pool.submit(self._copy_task, pkey, entry)
            started += 1
        return started

    def _collect(self, timeout: float) -> int:
        """Record finished copies (waiting up to `timeout` for the first); return how many."""
        done: list[_Done] = []
        try:
            if timeout > 0 and math.isfinite(timeout):
                done.append(self._done.get(timeout=timeout))
            else:
                done.append(self._done.get_nowait())
            while True:
                done.append(self._done.get_nowait())
        except queue.Empty:
            pass
        if not done:
            return 0
        removed: list[bytes] = []
        now = time.monotonic()
        with self._lock:
            for d in done:
                self._inflight.discard(d.pkey)
                current = self._pending.get(d.pkey)
                if d.outcome is _Outcome.FAILED:
                    self._retries += 1
                    if current is not None:
                        self._schedule_retry(d, now)
                    continue
                if d.outcome is _Outcome.COPIED:
                    self._copied += 1
                    self._copied_bytes += d.nbytes
                elif d.outcome is _Outcome.PRESENT:
                    self._present += 1
                else:
                    self._skipped += 1
                self._attempts.pop(d.pkey, None)
                self._last_error.pop(d.pkey, None)
                if current is None:
                    continue
                if current is not d.entry:
                    # Queued again by a later record while in flight: judge that one too.
                    self._queue.append(d.pkey)
                    continue
                del self._pending[d.pkey]
                self._pending_bytes -= current.size
                removed.append(d.pkey)
        self._progress.remove(removed)
        return len(done)

    def _schedule_retry(self, d: _Done, now: float) -> None:
        """Caller holds the lock."""
        attempts = self._attempts.get(d.pkey, 0) + 1
        self._attempts[d.pkey] = attempts
        delay = min(self.retry_max, self.retry_base * 2 ** min(attempts - 1, 30))
        delay *= random.uniform(0.8, 1.2)  # spread the retries of one outage
        when = now + delay
        self._next_try[d.pkey] = when
        heapq.heappush(self._retry_heap, (when, d.pkey))
        message = f"{type(d.error).__name__}: {d.error}"
        self._last_error[d.pkey] = message
        # Log the first failure and then every doubling: an outage is visible, not a flood.
        if attempts & (attempts - 1) == 0:
            level = logging.ERROR if isinstance(d.error, CorruptBlockError) else logging.WARNING
            log.log(
                level,
                "replicator %s: copy of %s failed (try %d, next in %.1fs): %s",
                self.local_region,
                d.entry.key,
                attempts,
                delay,
                message,
            )

    # -- one copy (on a pool thread) ------------------------------------------------

    def _copy_task(self, pkey: bytes, entry: PendingBlock) -> None:
        try:
            outcome, nbytes = self._copy(entry)
            self._done.put(_Done(pkey, entry, outcome, nbytes))
        except Exception as exc:
            if not isinstance(exc, StoreError | ReplicatorError):
                log.exception("unexpected failure copying %s", entry.key)
            self._done.put(_Done(pkey, entry, _Outcome.FAILED, 0, exc))

    def _copy(self, entry: PendingBlock) -> tuple[_Outcome, int]:
        current = self._live_slice(entry)
        if current is None or entry.index >= blocks_needed(current):
            # Deleted, compacted away, or truncated below this block.
            return _Outcome.SKIPPED, 0
        region = self.local_region
        local = self._fetcher.store(region)
        if local is None:
            raise StoreUnavailable(f"no block store is known for the local region {region}")
        key = entry.key
        if self._fetcher.call(region, local.exists, key):
            return _Outcome.PRESENT, 0
        if self._bucket is not None and not self._bucket.acquire(entry.size, self._stop):
            raise ReplicatorError("stopped while waiting for bandwidth")
        fetched = self._fetcher.fetch_remote(current, entry.index)
        self._fetcher.call(region, local.put_block, key, fetched.payload)
        if self.verify_copy:
            back = self._fetcher.call(region, local.get_block, key)
            if back != fetched.payload:
                raise CorruptBlockError(key, "the local copy differs from the source after the put")
        return _Outcome.COPIED, len(fetched.payload)

    def _live_slice(self, entry: PendingBlock) -> SliceRef | None:
        """Return the slice as the state holds it now (its length may have shrunk), or None.

        Of a slice recorded in several parts (an append split across chunks)
        the part needing the most blocks answers. An appended slice's chunk is
        found from the end of the file backwards, where appends land.
        """
        sid = entry.slice.slice_id
        if entry.chunk != _ANY_CHUNK:
            chunks = [entry.chunk]
        else:
            chunks = list(reversed(self.state.chunks(entry.inode)))
        best: SliceRef | None = None
        for chunk in chunks:
            found = False
            for ref in self.state.slices(entry.inode, chunk):
                if ref.slice_id == sid:
                    found = True
                    if best is None or blocks_needed(ref) > blocks_needed(best):
                        best = ref
            if best is not None and not found:
                break  # the parts of one slice lie in consecutive chunks
        return best


# -- running it -------------------------------------------------------------------


def replicator_dirs(state_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Return (state directory, progress directory) of a stand-alone replicator's `state_dir`."""
    root = Path(state_dir)
    return root / STATE_SUBDIR, root / PROGRESS_SUBDIR


def mount_progress_dir(state: State) -> Path:
    """Return where a mount's replicator keeps its progress: beside the state, never inside it."""
    return state.path.with_name(state.path.name + ".replicator")


def start_for_mount(
    log_: Log,
    state: State,
    region: str,
    stores: Mapping[str, BlockStore],
    *,
    progress_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Replicator:
    """Start the replicator of a mount on its live State and stores; the mount calls `close()`.

    Progress goes to `progress_dir`, by default `mount_progress_dir(state)`.
    `options` are the keyword arguments of `Replicator` (concurrency,
    bandwidth_limit, fetcher, ...).
    """
    directory = Path(progress_dir) if progress_dir is not None else mount_progress_dir(state)
    return Replicator(log_, region, stores, directory, state=state, **options).start()


def run_replicator(
    volume: str,
    journal_url: str,
    region: str,
    *,
    state_dir: str | os.PathLike[str],
    concurrency: int = DEFAULT_CONCURRENCY,
    bandwidth_limit: float | None = None,
    store_timeout: float = DEFAULT_FETCH_TIMEOUT_S,
    once: bool = False,
    timeout: float | None = None,
    stop: threading.Event | None = None,
    report_interval: float = 30.0,
    metrics_port: int | None = None,
    metrics_host: str = telemetry.DEFAULT_METRICS_HOST,
) -> int:
    """Run the block replicator of `region` for `volume`; return the process exit code.

    `state_dir` is the replicator's own directory (not a mount's state
    directory): `state/` holds the replicator's own fold of the log, which it
    keeps current to decide which blocks are still wanted, and `progress/`
    its position and pending blocks. A mount of the same region may run at
    the same time; both skip blocks the other already copied.

    Runs until SIGINT/SIGTERM (or `stop` is set), logging the backlog every
    `report_interval` seconds, and serving Prometheus metrics on `metrics_host`
    port `metrics_port` (see `tidefs.telemetry`). With `once`, returns 0 as soon as everything
    appended before the start is copied, or 1 if `timeout` passes first.
    Operational errors print one line on stderr and return 1.
    """
    from tidefs.journal.log import open_log
    from tidefs.replica.replica import Replica, fold_range
    from tidefs.replica.snapshot import SnapshotError, bootstrap_state
    from tidefs.replica.state import StateError, StateLockedError
    from tidefs.replica.status import StatusPublisher, region_fields

    stop = stop or threading.Event()
    state_path, progress_path = replicator_dirs(state_dir)
    log_: Log | None = None
    state: State | None = None
    replica: Replica | None = None
    replicator: Replicator | None = None
    publisher: StatusPublisher | None = None
    restore = _install_signals(stop)
    try:
        if (Path(state_dir) / "CURRENT").exists():
            raise ReplicatorError(
                f"{state_dir} is a state directory (of a mount?): give the replicator "
                "a directory of its own"
            )
        log_ = open_log(journal_url, volume)
        try:
            # A new replicator's own state starts from the newest usable snapshot.
            bootstrap_state(log_, state_path, volume=volume, prefer=region)
        except SnapshotError as exc:
            raise ReplicatorError(str(exc)) from exc
        try:
            state = State.open(state_path)
        except StateLockedError as exc:
            raise ReplicatorError(f"{state_dir} is in use by another replicator") from exc
        vol = state.volume()
        if vol is not None and vol.name != volume:
            raise ReplicatorError(f"{state_dir} holds volume {vol.name!r}, not {volume!r}")
        fold_range(log_, state)
        vol = state.volume()
        if vol is None:
            raise ReplicatorError(f"volume {volume!r} does not exist in {redact_url(journal_url)}")
        if vol.region(region) is None:
            names = ", ".join(r.name for r in vol.regions)
            raise ReplicatorError(
                f"region {region!r} is not a region of volume {volume!r} ({names})"
            )
        replica = Replica(log_, state, region).start()
        replicator = Replicator(
            log_,
            region,
            None,
            progress_path,
            state=state,
            concurrency=concurrency,
            bandwidth_limit=bandwidth_limit,
            store_timeout=store_timeout,
        ).start()
        # Publish like a mount does, so that `tidefs status` and gc see this region.
        rep, repl = replica, replicator
        publisher = StatusPublisher(
            journal_url,
            volume,
            region,
            lambda: region_fields(rep, replicator=repl),
        ).start()
        telemetry.configure(volume, region)
        telemetry.observe_region(
            telemetry.RegionSources(
                log=log_,
                applied=lambda: rep.applied,
                fetch_stats=repl.fetcher.stats,
                replicator=repl,
            )
        )
        try:
            telemetry.start_exporters(metrics_port, host=metrics_host)
        except OSError as exc:
            raise ReplicatorError(
                f"cannot serve metrics on {metrics_host} port {metrics_port}: {exc}"
            ) from exc
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        next_report = time.monotonic() + report_interval
        mark = replicator._idle_target()  # --once: everything appended before now
        while not stop.is_set():
            if replica.error is not None:
                raise ReplicatorError(f"the replicator's fold stopped: {replica.error}")
            now_vol = state.volume()
            if now_vol is not None and now_vol.region(region) is None:
                # `tidefs region remove`: nothing is copied here for anyone any more.
                print(
                    f"tidefs replicate: region {region} was removed from volume {volume} "
                    f"(applied offset {state.applied_offset()}): nothing left to replicate; "
                    "stopping",
                    file=sys.stderr,
                )
                return 0
            if once:
                if replicator._wait_idle(mark, min(0.5, max(0.0, deadline - time.monotonic()))):
                    _report(replicator, logging.INFO)
                    publisher.publish_final()
                    s = replicator.stats()
                    print(
                        f"replicated {s.blocks_copied} blocks ({s.bytes_copied} bytes) to region "
                        f"{region}; {s.blocks_present} already present, {s.blocks_skipped} "
                        "no longer needed"
                    )
                    return 0
                if time.monotonic() >= deadline:
                    b = replicator.backlog()
                    raise ReplicatorError(
                        f"not caught up within {timeout:g}s: {b.blocks} blocks ({b.bytes} bytes) pending"
                    )
            else:
                stop.wait(min(1.0, report_interval))
            if time.monotonic() >= next_report:
                _report(replicator, logging.INFO)
                next_report = time.monotonic() + report_interval
        return 0
    except (ReplicatorError, JournalError, StateError, StoreError, OSError) as exc:
        print(f"tidefs replicate: {exc}", file=sys.stderr)
        return 1
    finally:
        restore()
        telemetry.shutdown()
        if publisher is not None:
            publisher.stop(final=True)  # gc and the trim point stop counting this process
        if replicator is not None:
            replicator.close()
        if replica is not None:
            replica.stop()
        if state is not None:
            state.close()
        if log_ is not None:
            log_.close()


def _report(replicator: Replicator, level: int) -> None:
    b = replicator.backlog()
    s = replicator.stats()
    log.log(
        level,
        "replicator %s: backlog %d blocks (%d bytes, oldest %.1fs); copied %d (%d bytes), "
        "present %d, skipped %d, retries %d",
        replicator.local_region,
        b.blocks,
        b.bytes,
        b.oldest_age_s,
        s.blocks_copied,
        s.bytes_copied,
        s.blocks_present,
        s.blocks_skipped,
        s.retries,
    )


def _install_signals(stop: threading.Event) -> Any:
    """Make SIGINT and SIGTERM set `stop` (main thread only); return what undoes it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: object) -> None:
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


__all__ = [
    "Backlog",
    "BlockFailure",
    "PendingBlock",
    "Replicator",
    "ReplicatorError",
    "ReplicatorStats",
    "TokenBucket",
    "mount_progress_dir",
    "replicator_dirs",
    "run_replicator",
    "start_for_mount",
]
