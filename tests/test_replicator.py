"""The block replicator and the region-aware fetcher, against real stores and real logs.

Blocks are written the way a mount writes them: sealed into the writing
region's store under `block_key`, then recorded by a `CommitSlice` submitted
through that region's Replica. Stores are directories and S3 buckets on two
separate moto server processes (so that one region's endpoint can be stopped
or frozen while the other serves); logs are both backends (`journal_url`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.s3 import S3Server
from tidefs.journal.commands import (
    ROOT_INODE,
    CommitSlice,
    CompactChunk,
    CreateVolume,
    Mknod,
    Reclaim,
    Region,
    SetAttr,
    SliceRef,
    Unlink,
)
from tidefs.journal.log import Log, open_log
from tidefs.replica.blocks import block_key, new_slice_id, seal
from tidefs.replica.fetch import (
    BlockFetcher,
    BlockNotInAnyRegion,
    DeferredStore,
    blocks_needed,
    localize,
    open_region_stores,
)
from tidefs.replica.replica import Replica, fold_range
from tidefs.replica.replicator import (
    PendingBlock,
    Replicator,
    TokenBucket,
    replicator_dirs,
    run_replicator,
)
from tidefs.replica.state import State
from tidefs.replica.store import BlockStore, CorruptBlockError, StoreUnavailable, open_store

BS = 64 << 10
"""Block size of the test volumes: small, so that a few hundred KiB make many blocks."""

CHUNK = 4 << 20

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- a volume in several regions ------------------------------------------------------


def data(size: int, seed: int) -> bytes:
    """Return `size` bytes unique to (size, seed), so that a misplaced block is visible."""
    unit = seed.to_bytes(8, "big") + size.to_bytes(8, "big") + bytes(range(240))
    return (unit * (size // len(unit) + 1))[:size]


@dataclass
class Volume:
    """A formatted volume: its log, every region's store, and replicas that fold it."""

    name: str
    journal_url: str
    urls: dict[str, str]
    tmp: Path
    stores: dict[str, BlockStore] = field(default_factory=dict)
    replicas: dict[str, Replica] = field(default_factory=dict)
    logs: list[Log] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def open_log(self) -> Log:
        log_ = open_log(self.journal_url, self.name)
        self.logs.append(log_)
        return log_

    def replica(self, region: str) -> Replica:
        """The started Replica of `region` (its State folds the log in a thread)."""
        if region not in self.replicas:
            state = State.open(self.tmp / f"state-{region}")
            self.replicas[region] = Replica(self.open_log(), state, region).start()
        return self.replicas[region]

    def state(self, region: str) -> State:
        return self.replica(region).state

    def create(self, region: str, name: bytes) -> int:
        out = self.replica(region).submit(Mknod(ROOT_INODE, name, 0o100644, 0, 0))
        assert out.ok, out
        return out.inode

    def upload(self, region: str, payload: bytes, sid: int | None = None) -> SliceRef:
        """Store `payload` as the blocks of a new slice at `region`, as a mount's writer does."""
        sid = sid if sid is not None else new_slice_id()
        for i in range(0, len(payload), BS):
            self.stores[region].put_block(block_key(sid, i // BS), payload[i : i + BS])
        return SliceRef(sid, 0, len(payload), BS, region)

    def write(self, region: str, name: bytes, payload: bytes) -> tuple[int, SliceRef]:
        """Create file `name` and commit `payload` as its one slice, written at `region`."""
        ino = self.create(region, name)
        ref = self.upload(region, payload)
        out = self.replica(region).submit(CommitSlice(ino, 0, ref))
        assert out.ok, out
        return ino, ref

    def sync(self, *regions: str) -> None:
        """Wait until every named region has folded everything appended so far."""
        for region in regions:
            self.replica(region).barrier(timeout=30)

    def replicator(self, region: str, **options: object) -> Replicator:
        opts: dict[str, object] = {"store_timeout": 2.0, "retry_base": 0.05, "retry_max": 0.5}
        opts.update(options)
        r = Replicator(
            self.open_log(),
            region,
            self.stores,
            self.tmp / f"progress-{region}",
            state=self.state(region),
            **opts,  # type: ignore[arg-type]
        )
        self.closers.append(r.close)
        return r

    def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()
        for r in self.replicas.values():
            r.stop()
            r.state.close()
        for log_ in self.logs:
            log_.close()
        for store in self.stores.values():
            store.close()


@pytest.fixture
def make_volume(
    journal_url: str, journal_volume: str, tmp_path: Path
) -> Iterator[Callable[[dict[str, str]], Volume]]:
    """Format a volume with the given regions (name -> store URL); closed at teardown."""
    made: list[Volume] = []

    def make(urls: dict[str, str], primary: str = "a") -> Volume:
        vol = Volume(f"{journal_volume}{len(made)}", journal_url, dict(urls), tmp_path)
        made.append(vol)
        for name, url in urls.items():
            vol.stores[name] = open_store(url, timeout=2.0)
        regions = tuple(Region(n, u) for n, u in urls.items())
        create = CreateVolume(
            name=vol.name, regions=regions, primary=primary, chunk_size=CHUNK, block_size=BS
        )
        assert vol.replica(primary).submit(create).ok
        return vol

    try:
        yield make
    finally:
        for vol in made:
            vol.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path / 'log.db'}"


@pytest.fixture
def make_sqlite_volume(
    sqlite_url: str, tmp_path: Path
) -> Iterator[Callable[[dict[str, str]], Volume]]:
    """As `make_volume`, on SQLite only: for what the log backend does not change."""
    made: list[Volume] = []

    def make(urls: dict[str, str], primary: str = "a") -> Volume:
        vol = Volume(f"v{len(made)}", sqlite_url, dict(urls), tmp_path)
        made.append(vol)
        for name, url in urls.items():
            vol.stores[name] = open_store(url, timeout=2.0)
        regions = tuple(Region(n, u) for n, u in urls.items())
        create = CreateVolume(
            name=vol.name, regions=regions, primary=primary, chunk_size=CHUNK, block_size=BS
        )
        assert vol.replica(primary).submit(create).ok
        return vol

    try:
        yield make
    finally:
        for vol in made:
            vol.close()


@pytest.fixture(scope="module")
def s3_pair() -> Iterator[tuple[S3Server, S3Server]]:
    """Two S3 endpoints in two processes: two regions' stores that fail independently."""
    servers = (S3Server(), S3Server())
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                os.kill(server._proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
            server.close()


@pytest.fixture
def s3(s3_pair: tuple[S3Server, S3Server], s3_env: dict[str, str]) -> tuple[S3Server, S3Server]:
    """The two endpoints, running, with fake credentials in the environment."""
    for server in s3_pair:
        server.start()
    return s3_pair


def file_url(tmp_path: Path, region: str) -> str:
    return (tmp_path / f"store-{region}").as_uri()


def s3_url(server: S3Server) -> str:
    return server.store_url(server.create_bucket())


def assert_copied(vol: Volume, src: str, dst: str, ref: SliceRef) -> None:
    """Every needed block of `ref` is at `dst`, stored byte for byte as at `src`."""
    for i in range(blocks_needed(ref)):
        key = block_key(ref.slice_id, i)
        assert vol.stores[dst].get(key) == vol.stores[src].get(key), key


def freeze(server: S3Server) -> None:
    """Make the endpoint hang (SIGSTOP): connections open, nothing answers."""
    assert server._proc is not None
    os.kill(server._proc.pid, signal.SIGSTOP)


def thaw(server: S3Server) -> None:
    assert server._proc is not None
    os.kill(server._proc.pid, signal.SIGCONT)


# -- pieces ------------------------------------------------------------------------------


def test_blocks_needed_counts_only_visible_bytes() -> None:
    assert blocks_needed(SliceRef(1, 0, 1, BS, "a")) == 1
    assert blocks_needed(SliceRef(1, 0, BS, BS, "a")) == 1
    assert blocks_needed(SliceRef(1, 100, BS + 1, BS, "a")) == 2
    # A slice truncated to nothing needs no block, whatever it once had.
    assert blocks_needed(SliceRef(1, 0, 0, BS, "a")) == 0


def test_pending_block_round_trips() -> None:
    entry = PendingBlock(SliceRef(2**62, 7, 3 * BS, BS, "eu-west"), 2, 99, 3, 12345, 10**18)
    assert PendingBlock.decode(entry.encode()) == entry
    assert entry.size == BS
    assert PendingBlock(SliceRef(5, 0, BS + 10, BS, "a"), 1, 2, 0, 0, 0).size == 10


def test_token_bucket_holds_the_rate() -> None:
    bucket = TokenBucket(1 << 20)  # 1 MiB/s, 1 MiB burst
    start = time.monotonic()
    for _ in range(6):
        assert bucket.acquire(512 << 10)  # 3 MiB in all: the first MiB is the burst
    assert 1.8 <= time.monotonic() - start < 4.0


# -- copying -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_blocks_written_at_a_become_identical_at_b(
    backend: str,
    make_volume: Callable[[dict[str, str]], Volume],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    if backend == "s3":
        one, two = request.getfixturevalue("s3")
        urls = {"a": s3_url(one), "b": s3_url(two)}  # two endpoint processes
    else:
        urls = {"a": file_url(tmp_path, "a"), "b": file_url(tmp_path, "b")}
    vol = make_volume(urls)
    sizes = [100, 3 * BS + 17, 2 * BS]
    refs = [vol.write("a", b"f%d" % n, data(size, n))[1] for n, size in enumerate(sizes)]
    _ino, mine = vol.write("b", b"written-at-b", data(BS, 9))
    vol.sync("b")

    r = vol.replicator("b")
    # New beside a folded state: the live slices are queued from the state, not the log.
    assert (r.backlog().blocks, r.backlog().bytes) == (7, sum(sizes))
    assert r.run_once(timeout=30) == 7
    for ref in refs:
        assert_copied(vol, "a", "b", ref)
    for n, (size, ref) in enumerate(zip(sizes, refs, strict=True)):
        got = b"".join(
            vol.stores["b"].get_block(block_key(ref.slice_id, i)) for i in range(blocks_needed(ref))
        )
        assert got == data(size, n)
    s = r.stats()
    assert (s.blocks_copied, s.bytes_copied, s.retries) == (7, sum(sizes), 0)
    assert r.backlog().blocks == 0 and r.backlog().bytes == 0
    # The slice written at b is b's own: never queued, never sent to a.
    assert not vol.stores["a"].exists(block_key(mine.slice_id, 0))

    # Later writes are picked up from where the replicator stopped reading.
    ref = vol.write("a", b"later", data(BS + 1, 7))[1]
    vol.sync("b")
    assert r.run_once(timeout=30) == 2
    assert_copied(vol, "a", "b", ref)
    assert r.stats().blocks_present == 0


def test_three_regions_copy_from_every_home(
    make_volume: Callable[[dict[str, str]], Volume],
    s3: tuple[S3Server, S3Server],
    tmp_path: Path,
) -> None:
    one, two = s3
    # Three kinds of store: a bucket on each endpoint and a directory.
    vol = make_volume({"a": s3_url(one), "b": file_url(tmp_path, "b"), "c": s3_url(two)})
    from_a = [vol.write("a", b"a%d" % n, data(2 * BS + n + 1, n))[1] for n in range(3)]
    from_c = [vol.write("c", b"c%d" % n, data(BS + n + 1, 10 + n))[1] for n in range(2)]
    vol.sync("b", "c")

    rb = vol.replicator("b")
    rc = vol.replicator("c")
    assert rb.run_once(timeout=30) == 3 * 3 + 2 * 2
    assert rc.run_once(timeout=30) == 3 * 3  # its own slices stay where they are
    for ref in from_a:
        assert_copied(vol, "a", "b", ref)
        assert_copied(vol, "a", "c", ref)
    for ref in from_c:
        assert_copied(vol, "c", "b", ref)


def test_restart_resumes_after_a_kill(
    make_volume: Callable[[dict[str, str]], Volume], journal_url: str, tmp_path: Path
) -> None:
    vol = make_volume({"a": file_url(tmp_path, "a"), "b": file_url(tmp_path, "b")})
    refs = [vol.write("a", b"f%d" % n, data(10 * BS, n))[1] for n in range(4)]
    keys = [block_key(ref.slice_id, i) for ref in refs for i in range(10)]
    total = len(keys)
    concurrency = 4
    state_dir = tmp_path / "replicator-b"

    # The stand-alone replicator, slowed to ~8 blocks/s, killed mid-backlog.
    code = (
        "import sys\n"
        "from tidefs.replica.replicator import run_replicator\n"
        "sys.exit(run_replicator(sys.argv[1], sys.argv[2], 'b', state_dir=sys.argv[3],\n"
        f"    concurrency={concurrency}, bandwidth_limit={8 * BS}, store_timeout=2.0))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, vol.name, journal_url, str(state_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while sum(vol.stores["b"].exists(k) for k in keys) < 12:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the replicator copied nothing"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    present = sum(vol.stores["b"].exists(k) for k in keys)
    assert 12 <= present < total

    state_path, progress_path = replicator_dirs(state_dir)
    with State.open(state_path) as state:
        log_ = vol.open_log()
        fold_range(log_, state)
        r = Replicator(log_, "b", vol.stores, progress_path, state=state, concurrency=concurrency)
        try:
            # Resumed, not restarted: only what was unfinished (and in flight) is pending.
            backlog = r.backlog().blocks
            assert total - present <= backlog <= total - present + concurrency
            assert r.run_once(timeout=30) == total - present
            s = r.stats()
            assert s.blocks_present == backlog - (total - present) <= concurrency
        finally:
            r.close()
    for ref in refs:
        assert_copied(vol, "a", "b", ref)


def test_dead_blocks_are_skipped_at_copy_time(
    make_volume: Callable[[dict[str, str]], Volume], tmp_path: Path
) -> None:
    vol = make_volume({"a": file_url(tmp_path, "a"), "b": file_url(tmp_path, "b")})
    a = vol.replica("a")
    gone_ino, gone = vol.write("a", b"gone", data(2 * BS, 9))
    assert a.submit(Unlink(ROOT_INODE, b"gone")).ok
    assert a.submit(Reclaim(gone_ino)).ok
    vol.sync("b")
    r = vol.replicator("b")
    assert r.backlog().blocks == 0  # history before the state's offset is not replayed
    r.pause()
    r.start()
    deleted_ino, deleted = vol.write("a", b"deleted", data(3 * BS, 1))
    cut_ino, cut = vol.write("a", b"truncated", data(4 * BS, 2))
    old_ino, old = vol.write("a", b"compacted", data(2 * BS, 3))
    _kept_ino, kept = vol.write("a", b"kept", data(2 * BS, 4))
    # A commit the fold rejects (no such inode) leaves blocks nobody may read.
    orphan = vol.upload("a", data(BS, 5))
    assert a.submit(CommitSlice(10**9, 0, orphan)).errno != 0

    deadline = time.monotonic() + 20
    while r.backlog().blocks < 3 + 4 + 2 + 2 + 1:
        assert time.monotonic() < deadline, r.backlog()
        time.sleep(0.02)
    # Queued while alive; gone before their turn.
    assert a.submit(Unlink(ROOT_INODE, b"deleted")).ok
    assert a.submit(Reclaim(deleted_ino)).ok
    assert a.submit(SetAttr(cut_ino, size=BS + 1)).ok
    new = vol.upload("a", data(2 * BS, 3))
    assert a.submit(CompactChunk(old_ino, 0, (old.slice_id,), new)).ok
    vol.sync("b")
    r.resume()
    assert r.wait_idle(timeout=30)

    s = r.stats()
    assert (s.blocks_copied, s.blocks_skipped) == (2 + 2 + 2, 3 + 2 + 2 + 1)
    bkeys = set(vol.stores["b"].list("blocks/"))
    assert bkeys == {block_key(ref.slice_id, i) for ref in (cut, new, kept) for i in range(2)}
    assert not {block_key(deleted.slice_id, i) for i in range(3)} & bkeys
    assert not {block_key(gone.slice_id, i) for i in range(2)} & bkeys


def test_corrupt_home_copy_is_replaced_by_a_third_regions(
    make_sqlite_volume: Callable[[dict[str, str]], Volume],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    vol = make_sqlite_volume({r: file_url(tmp_path, r) for r in "abc"})
    payload = data(2 * BS, 1)
    _ino, ref = vol.write("a", b"f", payload)
    key = block_key(ref.slice_id, 1)
    vol.stores["c"].put_block(key, payload[BS:])  # c already has a good copy
    damaged = bytearray(seal(payload[BS:]))
    damaged[100] ^= 0x01
    vol.stores["a"].put(key, bytes(damaged))
    _ino, lonely = vol.write("a", b"g", data(BS, 2))  # only a has it, and a's is damaged
    lonely_key = block_key(lonely.slice_id, 0)
    good = vol.stores["a"].get(lonely_key)
    vol.stores["a"].put(lonely_key, good[:-1] + bytes([good[-1] ^ 0xFF]))
    vol.sync("b")

    r = vol.replicator("b", retry_base=0.05, retry_max=0.1)
    with caplog.at_level(logging.ERROR):
        assert r.run_once(timeout=1.5) == 2
    assert vol.stores["b"].get_block(key) == payload[BS:]
    assert "corrupt" in caplog.text
    assert r.stats().corrupt_copies >= 2
    # No region holds a good copy: reported, retried, never stored damaged.
    assert not vol.stores["b"].exists(lonely_key)
    (failure,) = r.failures()
    assert failure.key == lonely_key and "CorruptBlockError" in failure.error
    assert failure.attempts >= 2
    assert r.backlog().blocks == 1
    # Once a good copy turns up (here: put back at its home), the retry takes it.
    vol.stores["a"].put(lonely_key, good)
    assert r.run_once(timeout=10) == 1
    assert vol.stores["b"].get(lonely_key) == good


@pytest.mark.s3
def test_store_outages_fail_within_the_bound_and_heal(
    make_sqlite_volume: Callable[[dict[str, str]], Volume],
    s3: tuple[S3Server, S3Server],
) -> None:
    one, two = s3
    b_bucket = two.create_bucket()
    vol = make_sqlite_volume({"a": s3_url(one), "b": two.store_url(b_bucket)})
    payload = data(2 * BS, 1)
    _ino, ref = vol.write("a", b"f", payload)
    vol.sync("b")

    # The home region hangs: a read that needs it fails after the bound, not never.
    fetcher = BlockFetcher("b", vol.stores, timeout=1.0, retry_interval=1.0, write_back=False)
    freeze(one)
    try:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="did not answer within 1s"):
            fetcher.get(ref, 0)
        assert time.monotonic() - start < 2.5
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):  # known down: fails at once
            fetcher.get(ref, 1)
        assert time.monotonic() - start < 0.5
        # A mirror opening its stores now still gets one for the frozen region.
        reopened = open_region_stores(vol.state("b").volume() or (), timeout=1.0)
        assert isinstance(reopened["a"], DeferredStore)
    finally:
        thaw(one)
    time.sleep(1.1)
    assert fetcher.get(ref, 0) == payload[:BS]  # recovered by itself
    later = BlockFetcher("b", reopened, timeout=2.0, write_back=False)
    assert later.get(ref, 1) == payload[BS:]
    later.close()
    fetcher.close()
    for store in reopened.values():
        store.close()
    assert fetcher.stats().unavailable >= 1

    # The mirror's own store is down: copies fail, back off, and finish once it returns.
    _ino, ref2 = vol.write("a", b"g", data(3 * BS, 2))
    vol.sync("b")
    two.stop()
    r = vol.replicator("b", store_timeout=1.0, retry_base=0.1, retry_max=0.4).start()
    try:
        deadline = time.monotonic() + 15
        while not r.failures():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "StoreUnavailable" in r.failures()[0].error
        assert r.backlog().blocks == 5
        two.start()
        two.create_bucket(b_bucket)  # moto forgets everything on restart
        assert r.wait_idle(timeout=30), r.failures()
    finally:
        two.start()
    assert r.stats().blocks_copied == 5
    assert_copied(vol, "a", "b", ref)
    assert_copied(vol, "a", "b", ref2)


def test_fallback_reads_until_replicated_then_local(
    make_sqlite_volume: Callable[[dict[str, str]], Volume], tmp_path: Path
) -> None:
    vol = make_sqlite_volume({"a": file_url(tmp_path, "a"), "b": file_url(tmp_path, "b")})
    payloads = [data(size, n) for n, size in enumerate([BS // 2, 3 * BS, 2 * BS + 5])]
    refs = [vol.write("a", b"f%d" % n, p)[1] for n, p in enumerate(payloads)]
    nblocks = sum(blocks_needed(ref) for ref in refs)
    vol.sync("b")

    def read_all(fetcher: BlockFetcher) -> list[bytes]:
        return [b"".join(fetcher.get(ref, i) for i in range(blocks_needed(ref))) for ref in refs]

    with BlockFetcher("b", vol.stores, timeout=2.0, write_back=False) as fetcher:
        assert read_all(fetcher) == payloads  # replicator off: every block comes from a
        s = fetcher.stats()
        assert (s.fallback_reads, s.fallback_bytes, s.local_reads) == (
            nblocks,
            sum(map(len, payloads)),
            0,
        )
        first = vol.replicator("b")
        assert first.run_once(timeout=30) == nblocks
        first.close()
        assert read_all(fetcher) == payloads
        s2 = fetcher.stats()
        assert s2.fallback_reads == nblocks and s2.local_reads == nblocks
        with pytest.raises(ValueError):
            fetcher.get(refs[0], 1)  # beyond the slice: a caller's bug, said loudly
        with pytest.raises(BlockNotInAnyRegion):
            fetcher.get(SliceRef(new_slice_id(), 0, 10, BS, "a"), 0)

    # With write-back, one fallback read makes the block local for the next one.
    ref = vol.write("a", b"wb", data(2 * BS, 8))[1]
    vol.sync("b")
    with BlockFetcher("b", vol.stores, timeout=2.0) as fetcher:
        fetcher.get(ref, 0)
        assert fetcher.flush_write_backs(5)
        fetcher.get(ref, 0)
        s = fetcher.stats()
        assert (s.fallback_reads, s.local_reads, s.write_backs) == (1, 1, 1)
    r = vol.replicator("b")  # resumes where `first` stopped reading
    assert r.run_once(timeout=30) == 1
    assert r.stats().blocks_present == 1  # the written-back block is not fetched again


def test_corrupt_local_copy_is_read_from_home_and_repaired(
    make_sqlite_volume: Callable[[dict[str, str]], Volume], tmp_path: Path
) -> None:
    vol = make_sqlite_volume({"a": file_url(tmp_path, "a"), "b": file_url(tmp_path, "b")})
    payload = data(BS, 1)
    ref = vol.write("a", b"f", payload)[1]
    key = block_key(ref.slice_id, 0)
    vol.stores["b"].put(key, seal(payload)[:-1])  # a truncated local copy
    with BlockFetcher("b", vol.stores, timeout=2.0) as fetcher:
        assert fetcher.get(ref, 0) == payload
        assert fetcher.flush_write_backs(5)
        assert fetcher.stats().corrupt_copies == 1
    assert vol.stores["b"].get_block(key) == payload
    # Damaged everywhere: an error, never the damaged bytes.
    vol.stores["a"].put(key, b"junk")
    vol.stores["b"].put(key, b"junk")
    with (
        BlockFetcher("b", vol.stores, timeout=2.0) as fetcher,
        pytest.raises(CorruptBlockError, match="no region holds a verifiable copy"),
    ):
        fetcher.get(ref, 0)


def test_bandwidth_limit_paces_the_copies(
    make_sqlite_volume: Callable[[dict[str, str]], Volume], tmp_path: Path
) -> None:
    vol = make_sqlite_volume({"a": file_url(tmp_path, "a"), "b": file_url(tmp_path, "b")})
    ref = vol.write("a", b"f", data(32 * BS, 1))[1]  # 2 MiB
    vol.sync("b")
    r = vol.replicator("b", bandwidth_limit=1 << 20)  # 1 MiB/s after a 1 MiB burst
    start = time.monotonic()
    assert r.run_once(timeout=30) == 32
    assert 0.8 <= time.monotonic() - start < 5
    assert_copied(vol, "a", "b", ref)


def test_run_replicator_once_and_its_errors(
    make_sqlite_volume: Callable[[dict[str, str]], Volume],
    sqlite_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    vol = make_sqlite_volume({"a": file_url(tmp_path, "a"), "b": file_url(tmp_path, "b")})
    ref = vol.write("a", b"f", data(3 * BS, 1))[1]
    state_dir = tmp_path / "rep"
    assert (
        run_replicator(vol.name, sqlite_url, "b", state_dir=state_dir, once=True, timeout=30) == 0
    )
    assert "replicated 3 blocks" in capsys.readouterr().out
    assert_copied(vol, "a", "b", ref)
    assert run_replicator(vol.name, sqlite_url, "x", state_dir=tmp_path / "rx", once=True) == 1
    assert "region 'x' is not a region" in capsys.readouterr().err
    assert run_replicator("nope", sqlite_url, "b", state_dir=tmp_path / "rn", once=True) == 1
    assert "does not exist" in capsys.readouterr().err
    # A mount's state directory is not the replicator's.
    assert run_replicator(vol.name, sqlite_url, "b", state_dir=tmp_path / "state-a") == 1
    assert "directory of its own" in capsys.readouterr().err


def test_localize_copies_what_is_missing_and_names_lost_blocks(
    make_sqlite_volume: Callable[..., Volume], tmp_path: Path
) -> None:
    """The data half of `sync --data`: every needed block lands locally, from any home.

    A block that no region holds is reported by key at once (not retried
    until the deadline); everything else is copied, verified, exactly once.
    """
    vol = make_sqlite_volume({r: file_url(tmp_path, r) for r in "abc"})
    refs = [vol.write("a", b"fa%d" % i, data(3 * BS + i, i))[1] for i in range(3)]
    refs.append(vol.write("c", b"fc", data(2 * BS, 9))[1])
    lost = block_key(refs[0].slice_id, 1)
    vol.stores["a"].delete(lost)
    present = block_key(refs[1].slice_id, 0)
    vol.stores["b"].put_block(present, vol.stores["a"].get_block(present))  # already copied
    with BlockFetcher("b", vol.stores, timeout=2.0, write_back=False) as fetcher:
        first = localize(fetcher, refs, deadline=time.monotonic() + 30)
        assert first.present == 1
        assert first.copied == sum(blocks_needed(r) for r in refs) - 2
        assert list(first.missing) == [lost]
        assert "no region" in first.missing[lost]
        again = localize(fetcher, refs[1:], deadline=time.monotonic() + 30)
        assert (again.copied, again.missing) == (0, {})
    for ref in refs[2:]:
        assert_copied(vol, ref.home, "b", ref)
