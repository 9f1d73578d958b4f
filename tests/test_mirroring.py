"""Mirroring between regions, end to end: real mounts of two and three regions.

Every region is a real FUSE mount in its own process, with its own state
directory and its own block store: a directory, or a bucket on an S3
endpoint of its own (one moto server process per region, so that one
region's store can fail while the others serve). The metadata log is each
backend (`journal_url`: SQLite, then the Kafka broker).

What users rely on, and what is checked here:
- a file written at any region reads byte-identical at every other region
  after `tidefs sync`, and the regions' trees and state digests are equal;
- `--write-through primary`: the primary's store holds a block as soon as
  the write that made it is acknowledged;
- `tidefs sync --data`: afterwards every block is in the region's own store;
- fallback: a mirror without a replicator still reads everything (counted as
  fallback reads), and reads are local once the replicator has run;
- concurrent writers in two regions on one directory end with one tree,
  consistent with a serial order of the acknowledged operations;
- a store outage fails the reads that need it with EIO, bounded by the
  mount's `--store-timeout`, and they succeed again once it is back; nothing
  acknowledged is lost.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.mount import (
    TEST_BLOCK_SIZE,
    TEST_CHUNK_SIZE,
    MountFactory,
    TidefsMount,
    snapshot,
)
from tests.harness.netns import CROSS_REGION_DELAY_MS, DelayProxy
from tests.harness.s3 import S3Server
from tidefs.fs.mount import sync_mount
from tidefs.fs.volume import format_volume
from tidefs.journal.commands import Region
from tidefs.replica.blocks import block_key
from tidefs.replica.fetch import blocks_needed
from tidefs.replica.state import State
from tidefs.replica.status import read_status
from tidefs.replica.store import open_store

NAMES = ("a", "b", "c")

pytestmark = pytest.mark.fuse


# -- regions -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_trio() -> Iterator[tuple[S3Server, ...]]:
    """Three S3 endpoints in three processes: one per region, failing independently."""
    servers = tuple(S3Server() for _ in NAMES)
    try:
        yield servers
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                thaw(server)
            server.close()


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Each region's block store: a directory, or a bucket on its own S3 endpoint."""
    return str(request.param)


@dataclass
class Regions:
    """A volume with one mount per region; `urls` are the regions' store URLs."""

    volume: str
    journal_url: str
    urls: dict[str, str]
    mounts: dict[str, TidefsMount] = field(default_factory=dict)


RegionsFactory = Callable[..., Regions]


@pytest.fixture
def make_regions(
    mount_factory: MountFactory,
    journal_url: str,
    journal_volume: str,
    store_kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> RegionsFactory:
    """`make(n, extra={region: [mount options]}, mount=names)`: format a volume, mount regions."""
    counter = iter(range(100))

    def make(
        n: int,
        *,
        extra: dict[str, list[str]] | None = None,
        mount: tuple[str, ...] | None = None,
    ) -> Regions:
        k = next(counter)
        names = NAMES[:n]
        if store_kind == "file":
            urls = {r: (tmp_path / f"store{k}-{r}").as_uri() for r in names}
        else:
            request.getfixturevalue("s3_env")
            servers: tuple[S3Server, ...] = request.getfixturevalue("s3_trio")
            urls = {}
            for r, server in zip(names, servers, strict=False):
                server.start()
                urls[r] = server.store_url(server.create_bucket())
        volume = f"{journal_volume}{k}"
        format_volume(
            journal_url,
            volume,
            [Region(r, urls[r]) for r in names],
            names[0],
            chunk_size=TEST_CHUNK_SIZE,
            block_size=TEST_BLOCK_SIZE,
        )
        regions = Regions(volume, journal_url, urls)
        for r in mount if mount is not None else names:
            regions.mounts[r] = mount_factory(
                volume=volume,
                journal_url=journal_url,
                region=r,
                extra=(extra or {}).get(r, []),
            )
        return regions

    return make


# -- helpers -----------------------------------------------------------------------------


def content(tag: str, size: int) -> bytes:
    """`size` bytes unique to `tag`, so that a misplaced or stale block is visible."""
    seed = tag.encode() + b"|"
    reps = size // len(seed) + 1
    return (seed * reps)[:size]


def sync(m: TidefsMount, *, data: bool = False) -> None:
    assert sync_mount(str(m.path), timeout=60.0, data=data) == 0, m.log_tail()


def sync_all(regions: Regions) -> None:
    for m in regions.mounts.values():
        sync(m)


def applied_and_digest(m: TidefsMount) -> tuple[int, str]:
    """The region's applied offset and state digest, read beside the running mount."""
    state = State.open(str(m.state_dir), read_only=True)
    try:
        return state.applied_offset(), state.digest_hex()
    finally:
        state.close()


def live_block_keys(m: TidefsMount) -> list[str]:
    """Every block key that a file of the region's state needs."""
    state = State.open(str(m.state_dir), read_only=True)
    try:
        return [
            block_key(ref.slice_id, i)
            for _ino, _chunk, ref in state.iter_live_slices()
            for i in range(blocks_needed(ref))
        ]
    finally:
        state.close()


def assert_same_everywhere(regions: Regions) -> None:
    """After a barrier in every region: equal trees, equal offsets, equal digests."""
    sync_all(regions)
    mounts = list(regions.mounts.values())
    first = snapshot(mounts[0].path)
    for m in mounts[1:]:
        assert snapshot(m.path) == first, f"region {m.region} differs from {mounts[0].region}"
    # Nothing appends any more: every region reaches the same offset and digest.
    sync_all(regions)
    seen = {m.region: applied_and_digest(m) for m in mounts}
    assert len(set(seen.values())) == 1, seen


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in time: {what or predicate}")
        time.sleep(0.1)


def read_or_errno(p: Path) -> bytes | int:
    try:
        return p.read_bytes()
    except OSError as exc:
        assert exc.errno is not None
        return exc.errno


def freeze(server: S3Server) -> None:
    """Make an endpoint hang (SIGSTOP): connections open, nothing answers."""
    assert server._proc is not None
    os.kill(server._proc.pid, signal.SIGSTOP)


def thaw(server: S3Server) -> None:
    if server._proc is not None:
        os.kill(server._proc.pid, signal.SIGCONT)


# -- every region sees every region's files ------------------------------------------------


SIZES = (0, 1, 5_000, 3 * TEST_BLOCK_SIZE + 17, TEST_CHUNK_SIZE + TEST_BLOCK_SIZE + 3)
"""Empty, tiny, one block, several blocks, and across a chunk boundary."""


def write_region_files(m: TidefsMount) -> None:
    base = m.path / f"from-{m.region}"
    base.mkdir()
    for size in SIZES:
        (base / f"f{size}").write_bytes(content(f"{m.region}{size}", size))
    (base / "sub").mkdir()
    (base / "sub" / "deep").write_bytes(content(f"{m.region}-deep", 70_000))
    os.symlink("f1", base / "link")


@pytest.mark.parametrize("n", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_files_written_anywhere_read_identical_everywhere(
    make_regions: RegionsFactory, n: int
) -> None:
    regions = make_regions(n)
    for m in regions.mounts.values():
        write_region_files(m)
    # One region changes bytes in the middle of another region's file.
    b = regions.mounts["b"]
    sync(b)
    target = b.path / "from-a" / f"f{SIZES[-1]}"
    with open(target, "r+b") as f:
        f.seek(TEST_BLOCK_SIZE - 10)
        f.write(b"written in b across a block edge")
    assert_same_everywhere(regions)
    for m in regions.mounts.values():
        for origin in regions.mounts:
            for size in SIZES:
                got = (m.path / f"from-{origin}" / f"f{size}").read_bytes()
                want = bytearray(content(f"{origin}{size}", size))
                if origin == "a" and size == SIZES[-1]:
                    edit = b"written in b across a block edge"
                    want[TEST_BLOCK_SIZE - 10 : TEST_BLOCK_SIZE - 10 + len(edit)] = edit
                assert got == want, (m.region, origin, size)


# -- write-through ---------------------------------------------------------------------------


def test_write_through_primary_holds_blocks_when_acknowledged(
    make_regions: RegionsFactory,
) -> None:
    """With --write-through primary, an acknowledged write's blocks are in the primary's store.

    Only the mirror is mounted, without a replicator, so nothing but the
    write path itself can have put them there.
    """
    opts = ["--no-replicate", "--write-through", "primary"]
    regions = make_regions(2, extra={"b": opts}, mount=("b",))
    b = regions.mounts["b"]
    primary = open_store(regions.urls["a"], timeout=5.0)
    try:
        payload = content("through", 5 * TEST_BLOCK_SIZE + 123)
        with open(b.path / "f", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # acknowledged here
            keys = live_block_keys(b)
            assert len(keys) == 6
            assert all(primary.exists(k) for k in keys)
        (b.path / "g").write_bytes(b"small")  # close acknowledges
        keys = live_block_keys(b)
        assert len(keys) == 7
        assert all(primary.exists(k) for k in keys)
    finally:
        primary.close()


def test_without_write_through_blocks_stay_home(make_regions: RegionsFactory) -> None:
    """The default: the writer's own store only; the primary's store gets nothing by itself."""
    regions = make_regions(2, extra={"b": ["--no-replicate"]}, mount=("b",))
    b = regions.mounts["b"]
    (b.path / "f").write_bytes(content("home", 3 * TEST_BLOCK_SIZE))
    primary = open_store(regions.urls["a"], timeout=5.0)
    own = open_store(regions.urls["b"], timeout=5.0)
    try:
        keys = live_block_keys(b)
        assert len(keys) == 3
        assert all(own.exists(k) for k in keys)
        assert not any(primary.exists(k) for k in keys)
    finally:
        primary.close()
        own.close()


# -- sync --data --------------------------------------------------------------------------------


def test_sync_data_makes_every_block_local(make_regions: RegionsFactory) -> None:
    """`tidefs sync --data` returns once the mirror's own store holds every block, replicator off."""
    regions = make_regions(2, extra={"b": ["--no-replicate"]})
    a, b = regions.mounts["a"], regions.mounts["b"]
    files = {f"f{i}": content(f"sync-data-{i}", i * 50_000 + 1) for i in range(6)}
    for name, data in files.items():
        (a.path / name).write_bytes(data)
    mirror = open_store(regions.urls["b"], timeout=5.0)
    try:
        sync(b)
        keys = live_block_keys(b)
        assert keys and not all(mirror.exists(k) for k in keys)  # nothing copied them yet
        proc = subprocess.run(
            [sys.executable, "-m", "tidefs.fs.cli", "sync", str(b.path), "--data"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert all(mirror.exists(k) for k in keys)
        for name, data in files.items():
            assert (b.path / name).read_bytes() == data
    finally:
        mirror.close()


# -- fallback reads, then local ----------------------------------------------------------------


def test_mirror_without_replicator_falls_back_then_reads_locally(
    make_regions: RegionsFactory, store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Reads at a mirror without a replicator come from the home region, counted as fallbacks;
    once the replicator has run, they need no other region: the home store may be gone."""
    regions = make_regions(2, extra={"b": ["--no-replicate"]})
    a, b = regions.mounts["a"], regions.mounts["b"]
    early = {f"early{i}": content(f"early{i}", 40_000 * i + 7) for i in range(1, 6)}
    late = {f"late{i}": content(f"late{i}", 40_000 * i + 9) for i in range(1, 6)}
    for name, data in {**early, **late}.items():
        (a.path / name).write_bytes(data)
    a.stop()  # a's mount replicates nothing to b; only its store remains
    sync(b)
    for name, data in early.items():
        assert (b.path / name).read_bytes() == data
    wait_for(
        lambda: fallback_reads(regions, "b") >= len(early),
        what="b's status report counting its fallback reads",
    )

    # The region's replicator, run once as its own process, copies the rest.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tidefs.fs.cli",
            "replicate",
            regions.volume,
            "--journal",
            regions.journal_url,
            "--region",
            "b",
            "--state-dir",
            str(tmp_path / "replicate-b"),
            "--once",
            "--timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    # Now the home store goes away, and every late file still reads: from b's own store.
    if store_kind == "file":
        home = Path(urllib.request.url2pathname(regions.urls["a"].removeprefix("file://")))
        home.rename(home.with_name(home.name + ".away"))
    else:
        servers: tuple[S3Server, ...] = request.getfixturevalue("s3_trio")
        servers[0].stop()  # moto is in memory: a's blocks are gone for good
    for name, data in late.items():
        assert (b.path / name).read_bytes() == data


def fallback_reads(regions: Regions, region: str) -> int:
    """The fallback reads of `region` in its newest status report (0 before any)."""
    st = read_status(regions.journal_url, regions.volume).get(region)
    return st.fallback_reads if st is not None else 0


# -- concurrent writers in two regions -----------------------------------------------------------


@dataclass
class History:
    """What one region's writer did and which operations were acknowledged."""

    region: str
    created: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    unlinked: list[str] = field(default_factory=list)
    exclusive: dict[str, bool] = field(default_factory=dict)
    onto: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


OPS = 40
"""Operations per writer: enough to interleave, few enough for the default tier."""


def writer(d: Path, h: History) -> None:
    """Creates, renames, unlinks on own names; contested creates and renames on shared names."""
    t = h.region
    for i in range(OPS):
        name = f"{t}{i}"
        try:
            (d / name).write_bytes(name.encode())
            h.created.append(name)
            if i % 4 == 1 and f"{t}{i - 1}" not in h.onto:
                os.rename(d / f"{t}{i - 1}", d / f"{t}{i - 1}.r")
                h.renamed[f"{t}{i - 1}"] = f"{t}{i - 1}.r"
            if i % 4 == 3:
                os.unlink(d / f"{t}{i - 2}")
                h.unlinked.append(f"{t}{i - 2}")
            if i % 5 == 0:
                shared = f"shared{i}"
                try:
                    fd = os.open(d / shared, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    h.exclusive[shared] = False
                else:
                    os.write(fd, t.encode())
                    os.close(fd)
                    h.exclusive[shared] = True
            if i % 6 == 0:
                os.rename(d / name, d / f"target{i}")
                h.onto[name] = f"target{i}"
        except OSError as exc:  # unknown outcome: recorded, and the checks below fail on it
            h.failures.append(f"{name}: {exc}")


def run_writers(a: TidefsMount, b: TidefsMount) -> list[History]:
    """Run one writer in each region on the shared directory `d`; return their histories."""
    (a.path / "d").mkdir()
    sync(b)
    histories = [History("a"), History("b")]
    threads = [
        threading.Thread(target=writer, args=(m.path / "d", h))
        for m, h in zip((a, b), histories, strict=True)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=240)
    assert not any(th.is_alive() for th in threads)
    assert [h.failures for h in histories] == [[], []]
    return histories


def assert_serial_outcome(d: Path, histories: list[History]) -> None:
    """The tree in `d` is what some serial order of the acknowledged operations leaves.

    Each writer's own names follow from its own history alone; of two
    exclusive creates of one name exactly one succeeded, and its bytes are
    there; of two renames onto one target, the later one's source is there.
    Nothing else exists.
    """
    tree = {name: (d / name).read_bytes() for name in os.listdir(d)}
    expected: dict[str, bytes] = {}
    for h in histories:
        for name in h.created:
            if name in h.unlinked or name in h.onto:
                continue
            expected[h.renamed.get(name, name)] = name.encode()
    shared = {n for h in histories for n in h.exclusive}
    for n in shared:
        winners = [h.region for h in histories if h.exclusive.get(n)]
        assert len(winners) == 1, (n, winners)
        expected[n] = winners[0].encode()
    targets = {t for h in histories for t in h.onto.values()}
    for target in targets:
        sources = [src for h in histories for src, t in h.onto.items() if t == target]
        assert tree.get(target) in {s.encode() for s in sources}, target
        expected[target] = tree[target]
    assert tree == expected


@pytest.mark.parametrize("store_kind", ["file"], indirect=True)
def test_concurrent_writers_in_two_regions_agree(make_regions: RegionsFactory) -> None:
    regions = make_regions(2)
    a, b = regions.mounts["a"], regions.mounts["b"]
    histories = run_writers(a, b)
    assert_same_everywhere(regions)
    assert_serial_outcome(a.path / "d", histories)


# -- a store outage ---------------------------------------------------------------------------


@pytest.mark.parametrize("store_kind", ["s3"], indirect=True)
def test_store_outage_gives_eio_then_heals(
    make_regions: RegionsFactory, s3_trio: tuple[S3Server, ...]
) -> None:
    """A hung home store: reads that need it fail with EIO within the bound, then work again."""
    bound = ["--store-timeout", "1"]
    regions = make_regions(2, extra={"a": bound, "b": [*bound, "--no-replicate"]})
    a, b = regions.mounts["a"], regions.mounts["b"]
    home = s3_trio[0]
    data = content("outage", 3 * TEST_BLOCK_SIZE + 5)
    (a.path / "f").write_bytes(data)  # acknowledged before the outage
    sync(b)
    freeze(home)
    try:
        # b has no copy and a's store hangs: EIO, after the bounded wait, not a hang.
        assert read_or_errno(b.path / "f") == errno.EIO
        # A write at a needs a's store: it is not acknowledged (EIO), and stays buffered.
        fd = os.open(a.path / "g", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"during the outage")
            with pytest.raises(OSError) as info:
                os.fsync(fd)
            assert info.value.errno == errno.EIO
        finally:
            thaw(home)
            # The store is back: the buffered write commits on the next try.
            wait_for(lambda: _fsync_ok(fd), what="fsync after the store came back")
            os.close(fd)
    finally:
        thaw(home)
    wait_for(lambda: read_or_errno(b.path / "f") == data, what="read after the outage")
    sync(b)
    assert (b.path / "g").read_bytes() == b"during the outage"
    assert (a.path / "f").read_bytes() == data


def _fsync_ok(fd: int) -> bool:
    try:
        os.fsync(fd)
    except OSError:
        return False
    return True


# -- across a delayed link --------------------------------------------------------------------


@pytest.fixture(params=["netem", "proxy"])
def far_store_url(
    request: pytest.FixtureRequest, s3_trio: tuple[S3Server, ...], s3_env: dict[str, str]
) -> Iterator[str]:
    """A store URL 30 ms away each way: moto in a namespace behind netem, or behind a DelayProxy.

    The netem variant skips with the kernel's answer where it is refused;
    the proxy variant (a userspace forwarder holding every byte 30 ms each
    way) runs everywhere, so the delayed checks never go untested.
    """
    if request.param == "netem":
        server: S3Server = request.getfixturevalue("delayed_s3")
        yield server.store_url(server.create_bucket())
        return
    server = s3_trio[1]
    server.start()
    bucket = server.create_bucket()
    proxy = DelayProxy(("127.0.0.1", server.port), CROSS_REGION_DELAY_MS)
    try:
        yield server.store_url(bucket).replace(f":{server.port}", f":{proxy.port}")
    finally:
        proxy.close()


@pytest.mark.slow
def test_everything_holds_across_a_30ms_link(
    mount_factory: MountFactory,
    journal_url: str,
    journal_volume: str,
    s3_trio: tuple[S3Server, ...],
    far_store_url: str,
) -> None:
    """Region b's store sits 30 ms away each way from both mounts.

    (A region's store has one URL for every region, so b's own store is
    across the link too: slower for b, and the same checks must hold.) b
    writes through to the primary and has no replicator; a's replicator and
    a's reads of b's files cross the link. Trees and digests converge, the
    primary holds b's blocks on acknowledgement, `sync --data` completes,
    and concurrent writers agree.
    """
    near = s3_trio[0]
    near.start()
    urls = {"a": near.store_url(near.create_bucket()), "b": far_store_url}
    format_volume(
        journal_url,
        journal_volume,
        [Region(r, u) for r, u in urls.items()],
        "a",
        chunk_size=TEST_CHUNK_SIZE,
        block_size=TEST_BLOCK_SIZE,
    )
    regions = Regions(journal_volume, journal_url, urls)
    extra = {"a": [], "b": ["--no-replicate", "--write-through", "primary"]}
    for r in ("a", "b"):
        regions.mounts[r] = mount_factory(
            volume=journal_volume, journal_url=journal_url, region=r, extra=extra[r]
        )
    a, b = regions.mounts["a"], regions.mounts["b"]
    for m in (a, b):
        write_region_files(m)
    assert_same_everywhere(regions)
    for size in SIZES:
        assert (b.path / "from-a" / f"f{size}").read_bytes() == content(f"a{size}", size)
    primary = open_store(urls["a"], timeout=5.0)
    try:
        assert all(primary.exists(k) for k in live_block_keys(b))
    finally:
        primary.close()
    sync(b, data=True)
    histories = run_writers(a, b)
    assert_same_everywhere(regions)
    assert_serial_outcome(b.path / "d", histories)


# -- bounded staleness ---------------------------------------------------------------------


@pytest.mark.parametrize("store_kind", ["file"], indirect=True)
def test_max_staleness_makes_reads_wait_for_the_fold(make_regions: RegionsFactory) -> None:
    """With --max-staleness 1, a read while the fold lags more than 1 s waits and sees the change.

    b's fold is paused (SIGUSR1) before a creates a file; after the lag has
    passed the bound, a lookup in b is issued and the fold resumed (SIGUSR2).
    A mount that did not wait would answer ENOENT from its stale state.
    """
    regions = make_regions(2, extra={"b": ["--max-staleness", "1"]})
    a, b = regions.mounts["a"], regions.mounts["b"]
    (a.path / "old").write_bytes(b"before the pause")
    sync(b)
    assert (b.path / "old").read_bytes() == b"before the pause"
    assert b.proc is not None
    os.kill(b.proc.pid, signal.SIGUSR1)
    wait_for(lambda: "fold paused" in b.log_tail(), what="b's fold paused")
    (a.path / "fresh").write_bytes(b"written while b lagged")
    time.sleep(2.5)  # the lag passes the 1 s bound, and b's lag monitor (4 Hz) sees it
    result: list[bytes | int] = []
    reader = threading.Thread(target=lambda: result.append(read_or_errno(b.path / "fresh")))
    reader.start()
    time.sleep(0.5)  # let the lookup reach the mount before the fold resumes
    os.kill(b.proc.pid, signal.SIGUSR2)
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert result == [b"written while b lagged"]
