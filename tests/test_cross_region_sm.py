"""Two regions of one volume under random operations, pauses and resumes (hypothesis).

A RuleBasedStateMachine drives one volume in regions a and b, both in this
process: one SQLite log, a directory store per region, and per region the
pieces a mount is made of (a Replica folding into its own State, a
BlockFetcher, the fs DataPath that writes and reads files, and the block
Replicator). Rules create, write, rename, unlink and read files at a random
region, and pause or resume either region's fold or replicator. A reference
model (name -> bytes, in the order the log decided) says what every file
must hold.

While a region's fold is paused it accepts no writes (a writer waits for its
own region to fold its command), but it still serves reads: those may be
stale, so they must return a version the file once had, never other bytes.
After a sync barrier (`converge`: everything resumed, both folds at the head,
both replicators idle) both regions must equal the model byte for byte,
every block must be in both stores, and the digests must be equal.

On failure hypothesis prints the steps and a `@reproduce_failure` blob
(`print_blob=True`) that replays them.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from tidefs.fs.cache import DiskBlockCache
from tidefs.fs.data import DataError, DataPath
from tidefs.fs.volume import format_volume
from tidefs.journal.commands import ROOT_INODE, Command, Mknod, Outcome, Region, Rename, Unlink
from tidefs.journal.log import Log, open_log
from tidefs.replica.blocks import block_key
from tidefs.replica.fetch import BlockFetcher, blocks_needed
from tidefs.replica.replica import Replica
from tidefs.replica.replicator import Replicator
from tidefs.replica.state import State
from tidefs.replica.store import BlockStore, open_store

REGIONS = ("a", "b")
CHUNK = 256 << 10
BLOCK = 16 << 10
NAMES = ["f", "g", "h", "k"]

regions = st.sampled_from(REGIONS)
names = st.sampled_from(NAMES)
payloads = st.binary(min_size=1, max_size=40 << 10)
offsets = st.integers(0, 48 << 10)


@dataclass
class RegionUnderTest:
    """The parts of one region's mount, without FUSE."""

    name: str
    log: Log
    state: State
    replica: Replica
    stores: dict[str, BlockStore]
    data: DataPath
    replicator: Replicator
    fold_paused: bool = False
    replicator_paused: bool = False

    def submit(self, command: Command) -> Outcome:
        return self.replica.submit(command, timeout=30)

    def close(self) -> None:
        self.replicator.resume()
        self.replica.resume()
        self.data.close()
        self.replicator.close()
        self.replica.stop()
        self.state.close()
        self.log.close()
        for s in self.stores.values():
            s.close()


def _open_region(name: str, tmp: Path, journal_url: str, volume: str) -> RegionUnderTest:
    log = open_log(journal_url, volume)
    state = State.open(tmp / f"state-{name}")
    replica = Replica(log, state, name, poll_timeout=0.05).start()
    replica.barrier(30)
    stores = {r: open_store((tmp / f"store-{r}").as_uri()) for r in REGIONS}
    fetcher = BlockFetcher(name, stores)

    def submit(command: Command, request_id: bytes) -> Outcome:
        return replica.submit(command, request_id=request_id, timeout=30)

    data = DataPath(
        state=state,
        submit=submit,
        region=name,
        chunk_size=CHUNK,
        block_size=BLOCK,
        fetcher=fetcher,
        disk_cache=DiskBlockCache(str(tmp / f"cache-{name}"), 8 << 20),
        flush_interval=3600.0,
        compact_threshold=4,
        io_threads=4,
    )
    replicator = Replicator(
        open_log(journal_url, volume),
        name,
        stores,
        tmp / f"progress-{name}",
        state=state,
        poll_timeout=0.05,
        retry_base=0.05,
        retry_max=0.5,
    ).start()
    return RegionUnderTest(name, log, state, replica, stores, data, replicator)


class TwoRegions(RuleBasedStateMachine):
    """Random file operations at random regions, with the folds and replicators paused at will."""

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory(prefix="tidefs-xregion-")
        tmp = Path(self._tmp.name)
        journal_url = f"sqlite://{tmp / 'log.db'}"
        volume = "xr"
        format_volume(
            journal_url,
            volume,
            [Region(r, (tmp / f"store-{r}").as_uri()) for r in REGIONS],
            "a",
            chunk_size=CHUNK,
            block_size=BLOCK,
        )
        self.regions = {r: _open_region(r, tmp, journal_url, volume) for r in REGIONS}
        self.model: dict[str, bytes] = {}
        self.versions: dict[str, set[bytes]] = {}  # every content a name ever had, b"" included

    def teardown(self) -> None:
        """Every example ends with the barrier and its checks, then closes everything."""
        try:
            self.converge()
        finally:
            for r in self.regions.values():
                r.close()
            self._tmp.cleanup()

    # -- helpers ------------------------------------------------------------------

    def _writer(self, region: str) -> RegionUnderTest:
        """The region to write at; a paused fold is resumed first (its writer would wait)."""
        r = self.regions[region]
        if r.fold_paused:
            r.replica.resume()
            r.fold_paused = False
        r.replica.barrier(30)
        return r

    def _remember(self, name: str) -> None:
        self.versions.setdefault(name, {b""}).add(self.model[name])

    def _read(self, r: RegionUnderTest, name: str) -> bytes | None:
        ino = r.state.lookup(ROOT_INODE, name.encode())
        if ino is None:
            return None
        attr = r.state.getattr(ino)
        assert attr is not None
        fh = r.data.open(ino, os.O_RDONLY)
        try:
            return bytes(r.data.read(fh, 0, attr.size + 1))
        finally:
            r.data.release(fh)

    # -- file operations ----------------------------------------------------------

    @rule(region=regions, name=names)
    def create(self, region: str, name: str) -> None:
        r = self._writer(region)
        out = r.submit(Mknod(ROOT_INODE, name.encode(), 0o100644, 0, 0))
        if name in self.model:
            assert out.errno == errno.EEXIST, out
        else:
            assert out.ok, out
            self.model[name] = b""
            self._remember(name)

    @rule(region=regions, name=names, off=offsets, buf=payloads)
    def write(self, region: str, name: str, off: int, buf: bytes) -> None:
        r = self._writer(region)
        ino = r.state.lookup(ROOT_INODE, name.encode())
        assert (ino is None) == (name not in self.model)
        if ino is None:
            return
        fh = r.data.open(ino, os.O_WRONLY)
        try:
            assert r.data.write(fh, off, buf) == len(buf)
        finally:
            r.data.release(fh)
        old = self.model[name]
        new = bytearray(old.ljust(off + len(buf), b"\0") if len(old) < off + len(buf) else old)
        new[off : off + len(buf)] = buf
        self.model[name] = bytes(new)
        self._remember(name)

    @rule(region=regions, src=names, dst=names)
    def rename(self, region: str, src: str, dst: str) -> None:
        r = self._writer(region)
        out = r.submit(Rename(ROOT_INODE, src.encode(), ROOT_INODE, dst.encode()))
        if src not in self.model:
            assert out.errno == errno.ENOENT, out
            return
        assert out.ok, out
        if src != dst:
            self.model[dst] = self.model.pop(src)
            self._remember(dst)

    @rule(region=regions, name=names)
    def unlink(self, region: str, name: str) -> None:
        r = self._writer(region)
        out = r.submit(Unlink(ROOT_INODE, name.encode()))
        if name not in self.model:
            assert out.errno == errno.ENOENT, out
            return
        assert out.ok, out
        del self.model[name]

    @rule(region=regions, name=names)
    def read(self, region: str, name: str) -> None:
        """A caught-up region reads the model; a paused one a past version or a clean error."""
        r = self.regions[region]
        if not r.fold_paused:
            r.replica.barrier(30)
            assert self._read(r, name) == self.model.get(name)
            return
        try:
            got = self._read(r, name)
        except DataError:
            return  # a clean error (e.g. the block is gone with a later version)
        assert got is None or got in self.versions.get(name, set()), (
            f"region {region} (paused) read {len(got)} bytes of {name} that it never held"
        )

    # -- faults ---------------------------------------------------------------------

    @rule(region=regions)
    def pause_fold(self, region: str) -> None:
        r = self.regions[region]
        if not r.fold_paused:
            r.replica.pause()
            r.fold_paused = True

    @rule(region=regions)
    def resume_fold(self, region: str) -> None:
        r = self.regions[region]
        r.replica.resume()
        r.fold_paused = False

    @rule(region=regions)
    def pause_replicator(self, region: str) -> None:
        r = self.regions[region]
        r.replicator.pause()
        r.replicator_paused = True

    @rule(region=regions)
    def resume_replicator(self, region: str) -> None:
        r = self.regions[region]
        r.replicator.resume()
        r.replicator_paused = False

    # -- the barrier ------------------------------------------------------------------

    @rule()
    def converge(self) -> None:
        """Resume everything, then both regions equal the model and each other."""
        for r in self.regions.values():
            r.replica.resume()
            r.fold_paused = False
            r.replicator.resume()
            r.replicator_paused = False
        offsets = {name: r.replica.barrier(30) for name, r in self.regions.items()}
        head = max(offsets.values())
        for r in self.regions.values():
            assert r.replica.wait_applied(head, 30)
            assert r.replicator.wait_idle(30), f"replicator {r.name} not idle"
        for r in self.regions.values():
            listing = sorted(n.decode() for _ino, n, _c in r.state.readdir(ROOT_INODE))
            assert listing == sorted(self.model), f"region {r.name}"
            for name, content in self.model.items():
                assert self._read(r, name) == content, f"region {r.name}: {name}"
            _assert_blocks_local(r)
        a, b = self.regions["a"].state, self.regions["b"].state
        assert a.applied_offset() == b.applied_offset()
        assert a.digest() == b.digest()


def _assert_blocks_local(r: RegionUnderTest) -> None:
    """Every block of every live slice is in the region's own store, verifiably."""
    store = r.stores[r.name]
    for _ino, _chunk, ref in r.state.iter_live_slices():
        for i in range(blocks_needed(ref)):
            store.get_block(block_key(ref.slice_id, i))


def run_machine(max_examples: int, steps: int) -> None:
    machine = settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        derandomize=False,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(TwoRegions)
    machine.TestCase().runTest()


def test_two_regions_converge_to_the_model() -> None:
    run_machine(max_examples=25, steps=40)
