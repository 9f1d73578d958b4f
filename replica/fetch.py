"""Region-aware block reads: the local store first, then the block's home, then anyone.

Every region of a volume keeps its own block store, and a block is written
first to the store of the region that wrote it (its *home*, `SliceRef.home`).
The replicator copies it to the other regions later; until then, and whenever
a copy is damaged or a store is down, a reader must find the block somewhere
else. `BlockFetcher` is that search, shared by the mount's data path and the
replicator, so that both apply the same rules:

1. Order. The local store (no cross-region traffic), then the home region
   (it has every block it ever acknowledged), then every other region in name
   order (a third region may hold a copy when the home is down or damaged).
   A read served by any region but the local one is a *fallback read*; they
   are counted, because a mirror that keeps falling back is one whose
   replicator is behind, and that costs latency and egress. After a few
   local misses in a row (`HEDGE_AFTER_MISSES`) a read asks the local store
   and the others at once, so that a cold mirror does not pay a local round
   trip before every fallback; the first local hit ends that mode.

2. Verification. Blocks are immutable and sealed with a CRC
   (`tidefs.replica.blocks`), so any verified copy is as good as the
   original. A copy that fails verification is logged and skipped in favour
   of the next region: a corrupt byte is never returned, and one damaged
   store never makes a block unreadable while another region has it.

3. Write-behind. A block fetched from another region is also stored locally,
   in the background, so that the next read of it is local and the
   replicator finds it present. This also repairs a corrupt local copy: the
   good copy overwrites it (a put replaces the object atomically).

4. Bounded waits. Every store call runs on a small thread pool of its region
   and is waited for at most `timeout` seconds; the store's own timeouts
   (boto3's connect and read timeouts) free the thread later. A region whose
   store timed out or was unreachable is marked *down* for `retry_interval`
   seconds, during which reads skip it at once instead of each paying the
   timeout again; after that, the next read that needs it probes it, so a
   store that comes back is used again without anyone intervening. A read
   whose block only a down or unreachable region could hold fails with
   `StoreUnavailable` (the mount answers EIO) naming every region's answer.
   Worst case, one `get` takes `timeout` per region it tries.

Errors that leave `get` are all `StoreError`s: `StoreUnavailable` when some
region that might hold the block could not answer (retrying later may
succeed), `CorruptBlockError` when every copy found was damaged, and
`BlockNotInAnyRegion` (a `BlockNotFound`) when every region answered and none
holds the block.

Counters are plain integers under a lock (`stats()`); the OpenTelemetry
instruments of the mount read them, which keeps this module free of any
metrics dependency.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

from tidefs.journal.commands import Region, SliceRef
from tidefs.journal.log import redact_url
from tidefs.replica.blocks import BLOCKS_PREFIX, block_key
from tidefs.replica.keys import VolumeInfo
from tidefs.replica.store import (
    BlockNotFound,
    BlockStat,
    BlockStore,
    CorruptBlockError,
    FileStore,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
    open_store,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_FETCH_TIMEOUT_S = 5.0
"""Default bound, in seconds, on one store call made by a fetcher."""

DEFAULT_RETRY_INTERVAL_S = 2.0
"""Default time a region stays marked down before a read probes it again."""

DEFAULT_IO_THREADS = 16
"""Default threads per region for store calls: the fan-out of parallel block reads."""

MAX_PENDING_WRITE_BACKS = 64
"""Fallback-fetched blocks waiting to be stored locally, at most; more are dropped.

A write-back only saves a later fallback read (the replicator copies the
block anyway), so under pressure it is shed rather than queued without end.
"""


HEDGE_AFTER_MISSES = 2
"""Local misses in a row after which `get` asks the local store and the others at once.

A mirror whose replicator is behind misses locally read after read; then
each read pays a local round trip before the fallback. Asking both at once
hides that, at the price of one wasted remote read when the local copy has
appeared meanwhile (the first local hit ends the streak).
"""


def blocks_needed(ref: SliceRef) -> int:
    """Return how many blocks, from block 0, hold the bytes that `ref` covers.

    That is ceil((skip + length) / block_size). A truncate (or a compaction cut
    to the chunk's end) shortens a slice's `length` but leaves its blocks
    stored, so a slice may have more blocks than this; those hold bytes no
    reader can see and are never fetched. The part of a split append that
    skips the first bytes still counts their blocks: the slice has them all.
    """
    if ref.length <= 0:
        return 0
    return (ref.skip + ref.length + ref.block_size - 1) // ref.block_size


class BlockNotInAnyRegion(BlockNotFound):
    """Every region answered, and none holds the block (gc'd, or never uploaded)."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(key)
        self.args = (f"block {key!r} is in no region's store ({detail})",)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class FetchStats:
    """Counters of one fetcher since it was made."""

    local_reads: int
    """Reads served by the local store."""
    fallback_reads: int
    """Reads served by another region's store (by `get`; the replicator's copies are not counted)."""
    fallback_bytes: int
    """Payload bytes of those fallback reads."""
    remote_fetches: int
    """Blocks fetched from another region by `fetch_remote` (the replicator's copies)."""
    corrupt_copies: int
    """Copies that failed verification and were skipped."""
    unavailable: int
    """Store calls that timed out or found their store unreachable."""
    write_backs: int
    """Fallback-fetched blocks stored locally."""
    write_back_errors: int
    """Write-backs that failed (the block stays remote until the replicator copies it)."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A verified block payload and the region whose store served it."""

    payload: bytes
    region: str


class BlockFetcher:
    """Read verified blocks by region: local, home, then any other; see the module doc.

    Thread-safe; the stores are borrowed (the caller closes them after `close`).
    """

    def __init__(
        self,
        local_region: str,
        stores: Mapping[str, BlockStore],
        *,
        timeout: float = DEFAULT_FETCH_TIMEOUT_S,
        retry_interval: float = DEFAULT_RETRY_INTERVAL_S,
        write_back: bool = True,
        io_threads: int = DEFAULT_IO_THREADS,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if retry_interval < 0:
            raise ValueError(f"retry_interval must be >= 0, not {retry_interval}")
        if io_threads < 1:
            raise ValueError(f"io_threads must be at least 1, not {io_threads}")
        self.local_region = local_region
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.write_back = write_back
        self.io_threads = io_threads
        self._lock = threading.Lock()
        self._stores: dict[str, BlockStore] = dict(stores)
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._down_until: dict[str, float] = {}
        self._down_reason: dict[str, str] = {}
        self._writing: set[str] = set()
        self._writer: ThreadPoolExecutor | None = None
        self._hedger: ThreadPoolExecutor | None = None
        self._local_misses = 0
        self._closed = False
        self._local_reads = 0
        self._fallback_reads = 0
        self._fallback_bytes = 0
        self._remote_fetches = 0
        self._corrupt = 0
        self._unavailable = 0
        self._write_backs = 0
        self._write_back_errors = 0

    # -- configuration ---------------------------------------------------------

    def set_store(self, region: str, store: BlockStore) -> None:
        """Add (or replace) the store of `region`, e.g. after an AddRegion command."""
        with self._lock:
            self._stores[region] = store
            self._down_until.pop(region, None)

    def store(self, region: str) -> BlockStore | None:
        """Return the store of `region`, None when the fetcher knows no such region."""
        with self._lock:
            return self._stores.get(region)

    def regions(self) -> list[str]:
        """Return the names of the regions whose stores this fetcher reads, sorted."""
        with self._lock:
            return sorted(self._stores)

    # -- reading ---------------------------------------------------------------

    def get(self, ref: SliceRef, index: int) -> bytes:
        """Return the verified payload of block `index` of slice `ref`.

        Tries the local store, the home region, then every other region. A
        block served by another region counts as a fallback read and is
        stored locally in the background (unless `write_back` is off).
        Raises StoreUnavailable, CorruptBlockError or BlockNotInAnyRegion
        (see the module doc), and ValueError for an index outside the slice.
        """
        key = self._key(ref, index)
        order = self._order(ref.home, include_local=True)
        with self._lock:
            hedge = self._local_misses >= HEDGE_AFTER_MISSES
        if hedge and len(order) > 1:
            fetched = self._fetch_hedged(key, ref, order)
        else:
            fetched = self._fetch(key, ref, order)
        size = len(fetched.payload)
        with self._lock:
            if fetched.region == self.local_region:
                self._local_reads += 1
                self._local_misses = 0
            else:
                self._fallback_reads += 1
                self._fallback_bytes += size
                self._local_misses += 1
        if fetched.region != self.local_region and self.write_back:
            self._write_back(key, fetched.payload)
        return fetched.payload

    def fetch_remote(self, ref: SliceRef, index: int) -> Fetched:
        """Return block `index` of `ref` from another region: home first, then the others.

        The replicator's read: the local store is not consulted, nothing is
        written back, and it is not a fallback read. Raises as `get` does.
        """
        key = self._key(ref, index)
        fetched = self._fetch(key, ref, self._order(ref.home, include_local=False))
        with self._lock:
            self._remote_fetches += 1
        return fetched

    def call(self, region: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one store call `fn(*args)` against `region`, waiting at most `timeout`.

        The bounded call that `get` makes, for other users of the same
        stores (the replicator's exists and put): a timeout or an unreachable
        store raises StoreUnavailable and marks the region down; any call
        that gets an answer marks it up again.
        """
        reason = self._down(region)
        if reason is not None:
            raise StoreUnavailable(reason)
        future = self._submit(region, fn, *args)
        try:
            result = future.result(self.timeout)
        except FutureTimeout:
            future.cancel()
            url = self._url(region)
            message = (
                f"region {region}'s store {redact_url(url)} did not answer within {self.timeout:g}s"
            )
            self._mark_down(region, message)
            raise StoreUnavailable(message) from None
        except StoreUnavailable as exc:
            self._mark_down(region, f"region {region}'s store is unreachable: {exc}")
            raise
        except StoreConfigError as exc:
            # A deferred store that cannot be opened at all: as good as down.
            self._mark_down(region, f"region {region}'s store cannot be opened: {exc}")
            raise StoreUnavailable(str(exc)) from exc
        except StoreError:
            self._mark_up(region)
            raise
        finally:
            # The future holds the exception, whose traceback holds this frame,
            # which holds the future: without this, that cycle (and every frame
            # on the traceback, with the 4 MiB payloads in their locals) would
            # live until the cyclic gc ran. Measured: fallback reads ran at half speed.
            del future
        self._mark_up(region)
        return result

    def _fetch(self, key: str, ref: SliceRef, order: list[str]) -> Fetched:
        notes: list[str] = []
        unavailable = False
        corrupt = False
        for region in order:
            store = self.store(region)
            if store is None:
                continue
            try:
                payload = self._get_block(region, store, key)
            except BlockNotFound:
                notes.append(f"{region}: absent")
                continue
            except CorruptBlockError as exc:
                corrupt = True
                with self._lock:
                    self._corrupt += 1
                log.error("region %s holds a corrupt copy, trying the next region: %s", region, exc)
                notes.append(f"{region}: corrupt ({exc.reason})")
                continue
            except StoreError as exc:
                unavailable = True
                notes.append(f"{region}: {exc}")
                continue
            return Fetched(payload, region)
        detail = "; ".join(notes) or "no region has a store"
        where = f"block {key} of slice {ref.slice_id:016x} (home {ref.home})"
        if unavailable:
            raise StoreUnavailable(f"{where} is unreadable now: {detail}")
        if corrupt:
            log.error("%s: no region holds a verifiable copy (%s)", where, detail)
            raise CorruptBlockError(key, f"no region holds a verifiable copy ({detail})")
        raise BlockNotInAnyRegion(key, detail)

    def _get_block(self, region: str, store: BlockStore, key: str) -> bytes:
        """`store.get_block(key)` as `call` makes it; a directory store's on this thread.

        A directory store is local I/O, which has no timeout to bound (its
        store ignores one): the hand-off to the region's pool and back cost
        two thread switches per block, most of a small file's read. Callers
        are worker threads, never the event loop. Region health is kept as
        `call` keeps it.
        """
        if not isinstance(store, FileStore):
            return self.call(region, store.get_block, key)
        reason = self._down(region)
        if reason is not None:
            raise StoreUnavailable(reason)
        try:
            payload = store.get_block(key)
        except StoreUnavailable as exc:
            self._mark_down(region, f"region {region}'s store is unreachable: {exc}")
            raise
        except StoreError:
            self._mark_up(region)
            raise
        self._mark_up(region)
        return payload

    def _fetch_hedged(self, key: str, ref: SliceRef, order: list[str]) -> Fetched:
        """Ask the local store and, at the same time, the other regions (see `get`).

        The local answer wins when it has the block (the remote read, already
        under way, is discarded). Otherwise the remote read has been running
        since the start, so the local miss costs no extra round trip. When both
        fail, the plain sequential search runs once more, for its exact error.
        """
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the block fetcher is closed")
            if self._hedger is None:
                self._hedger = ThreadPoolExecutor(
                    self.io_threads, thread_name_prefix="tidefs-hedge"
                )
            hedger = self._hedger
        remote = hedger.submit(self._fetch, key, ref, order[1:])
        try:
            return self._fetch(key, ref, order[:1])
        except StoreError:
            pass
        try:
            # Every store call in there is bounded by `timeout`; this only adds slack.
            return remote.result(self.timeout * len(order) + 1)
        except (StoreError, FutureTimeout):
            return self._fetch(key, ref, order)
        finally:
            del remote  # see `call`: a held exception would keep payloads alive

    def _key(self, ref: SliceRef, index: int) -> str:
        if not 0 <= index < blocks_needed(ref):
            raise ValueError(
                f"block {index} is outside slice {ref.slice_id:016x} "
                f"({ref.length} bytes in blocks of {ref.block_size})"
            )
        return block_key(ref.slice_id, index)

    def _order(self, home: str, *, include_local: bool) -> list[str]:
        with self._lock:
            names = sorted(self._stores)
        order = [self.local_region] if include_local else []
        if home != self.local_region:
            order.append(home)
        order.extend(r for r in names if r not in order and r != self.local_region)
        return order

    # -- region health ---------------------------------------------------------

    def _down(self, region: str) -> str | None:
        """Return why `region` is skipped right now, None when it may be tried."""
        with self._lock:
            until = self._down_until.get(region)
            if until is None:
                return None
            if time.monotonic() >= until:
                # Probe it: let this one call through; a failure marks it again.
                del self._down_until[region]
                return None
            left = until - time.monotonic()
            return f"{self._down_reason.get(region, f'region {region} is down')} (next try in {left:.1f}s)"

    def _mark_down(self, region: str, reason: str) -> None:
        with self._lock:
            self._unavailable += 1
            first = region not in self._down_reason
            self._down_until[region] = time.monotonic() + self.retry_interval
            self._down_reason[region] = reason
        if first:
            log.warning("%s; skipping it for %gs", reason, self.retry_interval)

    def _mark_up(self, region: str) -> None:
        with self._lock:
            if region not in self._down_reason:
                return
            self._down_reason.pop(region, None)
            self._down_until.pop(region, None)
        log.warning("region %s's store answers again", region)

    def is_down(self, region: str) -> bool:
        """Return whether reads skip `region` right now (its store recently failed)."""
        with self._lock:
            until = self._down_until.get(region)
            return until is not None and time.monotonic() < until

    # -- threads ---------------------------------------------------------------

    def _submit(self, region: str, fn: Callable[..., T], *args: Any) -> Future[T]:
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the block fetcher is closed")
            pool = self._pools.get(region)
            if pool is None:
                # One pool per region: a hung store ties up its own threads only.
                pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix=f"tidefs-io-{region}")
                self._pools[region] = pool
        return pool.submit(fn, *args)

    def _url(self, region: str) -> str:
        store = self.store(region)
        return getattr(store, "url", "?") if store is not None else "?"

    def _write_back(self, key: str, payload: bytes) -> None:
        local = self.store(self.local_region)
        if local is None or self.is_down(self.local_region):
            return
        with self._lock:
            if (
                self._closed
                or key in self._writing
                or len(self._writing) >= MAX_PENDING_WRITE_BACKS
            ):
                return
            self._writing.add(key)
            if self._writer is None:
                self._writer = ThreadPoolExecutor(2, thread_name_prefix="tidefs-writeback")
            writer = self._writer
        writer.submit(self._store_locally, local, key, payload)

    def _store_locally(self, local: BlockStore, key: str, payload: bytes) -> None:
        try:
            local.put_block(key, payload)
        except Exception as exc:  # best effort: the replicator copies the block anyway
            with self._lock:
                self._write_back_errors += 1
            log.info("could not store fetched block %s locally: %s", key, exc)
        else:
            with self._lock:
                self._write_backs += 1
        finally:
            with self._lock:
                self._writing.discard(key)

    def flush_write_backs(self, timeout: float = 10.0) -> bool:
        """Wait until no write-back is pending; False if some still are after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._writing:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    # -- figures and lifecycle ---------------------------------------------------

    def stats(self) -> FetchStats:
        """Return the counters (a consistent snapshot)."""
        with self._lock:
            return FetchStats(
                local_reads=self._local_reads,
                fallback_reads=self._fallback_reads,
                fallback_bytes=self._fallback_bytes,
                remote_fetches=self._remote_fetches,
                corrupt_copies=self._corrupt,
                unavailable=self._unavailable,
                write_backs=self._write_backs,
                write_back_errors=self._write_back_errors,
            )

    def close(self) -> None:
        """Stop the I/O threads; calls still running in a hung store are abandoned."""
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
            self._pools.clear()
            writer, self._writer = self._writer, None
            hedger, self._hedger = self._hedger, None
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        if hedger is not None:
            hedger.shutdown(wait=False, cancel_futures=True)
        if writer is not None:
            writer.shutdown(wait=False)

    def __enter__(self) -> BlockFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- making blocks local ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalizeResult:
    """What `localize` did: blocks already local, copied, and still missing (with why)."""

    present: int
    copied: int
    missing: dict[str, str]


def localize(
    fetcher: BlockFetcher,
    refs: Iterable[SliceRef],
    *,
    deadline: float,
    concurrency: int = 8,
    retry_pause: float = 0.2,
) -> LocalizeResult:
    """Make every block that `refs` need present in the fetcher's local store.

    The data half of `tidefs sync --data`: the local store is listed once,
    and each absent block is fetched from another region (home first,
    verified) and put locally, `concurrency` at a time, retried until
    `deadline` (time.monotonic) while a store is unreachable. It does not wait
    for a replicator, so it completes whether one runs or not; a block the
    replicator copies at the same time is simply put twice (blocks are
    immutable). A block no region holds is reported at once, not retried.
    """
    region = fetcher.local_region
    local = fetcher.store(region)
    if local is None:
        raise StoreUnavailable(f"region {region} has no block store")
    wanted: dict[str, tuple[SliceRef, int]] = {}
    for ref in refs:
        for i in range(blocks_needed(ref)):
            wanted.setdefault(block_key(ref.slice_id, i), (ref, i))
    present = fetcher.call(region, lambda: set(local.list(BLOCKS_PREFIX)))
    todo = {k: v for k, v in wanted.items() if k not in present}
    copied = 0
    why: dict[str, str] = {}
    lost: dict[str, str] = {}

    def copy(key: str, ref: SliceRef, index: int) -> None:
        fetched = fetcher.fetch_remote(ref, index)
        fetcher.call(region, local.put_block, key, fetched.payload)

    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="tidefs-localize") as pool:
        while todo:
            futures = {k: pool.submit(copy, k, *v) for k, v in todo.items()}
            for key, fut in futures.items():
                exc = fut.exception()
                if exc is None:
                    copied += 1
                    del todo[key]
                    why.pop(key, None)
                elif isinstance(exc, (BlockNotFound, CorruptBlockError)):
                    lost[key] = str(exc)
                    del todo[key]
                else:
                    why[key] = str(exc)
            if not todo or time.monotonic() + retry_pause >= deadline:
                break
            time.sleep(retry_pause)
    missing = {**{k: why.get(k, "not tried before the deadline") for k in todo}, **lost}
    return LocalizeResult(len(wanted.keys() & present), copied, missing)


# -- opening the stores of a volume -------------------------------------------------


class DeferredStore(BlockStore):
    """A store that could not be opened yet: every call tries to open it, then delegates.

    A mirror must mount and serve while a remote region is down, and use that
    region once it returns, without a restart: so a store that fails to open
    stands in as this, and its calls raise StoreUnavailable until it opens.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self._options = options
        self._store: BlockStore | None = None
        self._failed = False
        self._lock = threading.Lock()

    def _open(self) -> BlockStore:
        with self._lock:
            if self._store is None:
                try:
                    self._store = open_store(self.url, **self._options)
                except StoreError:
                    self._failed = True
                    raise
                if self._failed:
                    log.warning("block store %s is reachable now", redact_url(self.url))
            return self._store

    @property
    def opened(self) -> bool:
        """Whether the store has been opened."""
        return self._store is not None

    def put(self, key: str, data: bytes) -> None:
        self._open().put(key, data)

    def get(self, key: str) -> bytes:
        return self._open().get(key)

    def exists(self, key: str) -> bool:
        return self._open().exists(key)

    def stat(self, key: str) -> BlockStat | None:
        return self._open().stat(key)

    def delete(self, key: str) -> None:
        self._open().delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        self._open().delete_many(keys)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self._open().list(prefix)

    def put_block(self, key: str, payload: bytes | bytearray | memoryview) -> None:
        self._open().put_block(key, payload)

    def get_block(self, key: str) -> bytes:
        return self._open().get_block(key)

    def close(self) -> None:
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()


def open_region_store(url: str, **options: Any) -> BlockStore:
    """Open the store at `url`, or a `DeferredStore` for it when it is unreachable now.

    A malformed URL (StoreConfigError) is raised at once: that will not heal.
    """
    try:
        return open_store(url, **options)
    except StoreConfigError:
        raise
    except StoreError as exc:
        log.warning("block store %s is not reachable (%s); will retry on use", redact_url(url), exc)
        store = DeferredStore(url, **options)
        store._failed = True
        return store


def open_region_stores(
    volume: VolumeInfo | Iterable[Region],
    *,
    timeout: float = DEFAULT_FETCH_TIMEOUT_S,
    **options: Any,
) -> dict[str, BlockStore]:
    """Open the block store of every region of `volume`, keyed by region name.

    `volume` is the volume record (`State.volume()`) or its regions.
    `timeout` bounds each call of each store (passed to `open_store` with
    the other `options`). A store unreachable now is returned as a
    `DeferredStore` that opens on first successful use, so that one region
    being down never stops another from serving. The caller closes the stores.
    """
    regions = volume.regions if isinstance(volume, VolumeInfo) else tuple(volume)
    stores: dict[str, BlockStore] = {}
    try:
        for r in regions:
            stores[r.name] = open_region_store(r.store_url, timeout=timeout, **options)
    except BaseException:
        for store in stores.values():
            with contextlib.suppress(Exception):
                store.close()
        raise
    return stores
