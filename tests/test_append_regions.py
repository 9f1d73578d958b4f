"""O_APPEND through real mounts of two and three regions, on both journals.

Appenders in every region open, append one line and close, all at once. The
fold places each append at the end of the file at its log position, so after
`tidefs sync` every region holds every line exactly once, in the same order,
and each writer's lines in the order it wrote them. (Before appends were
placed by the fold, each writer's line went where its mount believed the end
was, and two regions' lines overwrote each other: 120 of 200 lines remained.)

A writer also reads its own appends at once through its mount (a handle
opened with O_APPEND, which bypasses the kernel's page cache), before and
after they are folded and moved behind other regions' lines: never a gap
(zeros), never a line twice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.mount import TEST_BLOCK_SIZE, MountFactory, TidefsMount
from tidefs.fs.mount import sync_mount
from tidefs.fs.volume import format_volume
from tidefs.journal.commands import Region
from tidefs.replica.blocks import block_key
from tidefs.replica.fetch import blocks_needed
from tidefs.replica.state import State
from tidefs.replica.store import open_store

pytestmark = pytest.mark.fuse

CHUNK = 1024
"""Small chunks: the log file crosses many chunk boundaries, mid-line."""


def _regions(
    mount_factory: MountFactory, journal_url: str, volume: str, tmp_path: Path, n: int
) -> list[TidefsMount]:
    names = "abc"[:n]
    urls = {r: (tmp_path / f"store-{r}").as_uri() for r in names}
    format_volume(
        journal_url,
        volume,
        [Region(r, urls[r]) for r in names],
        "a",
        chunk_size=CHUNK,
        block_size=min(TEST_BLOCK_SIZE, CHUNK),
    )
    # No compaction: it would replace the appended slices (and fetch them meanwhile).
    extra = ["--compact-threshold", "0"]
    return [
        mount_factory(volume=volume, journal_url=journal_url, region=r, extra=extra) for r in names
    ]


def _sync(mounts: list[TidefsMount]) -> None:
    for m in mounts:
        assert sync_mount(str(m.path), timeout=60.0) == 0, m.log_tail()


def _line(region: str, i: int) -> bytes:
    return f"{region} line {i:04d} {'.' * (i % 23)}\n".encode()


def _run_all(workers: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def run(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors


def _read_appending(path: Path) -> bytes:
    """Read a whole file through a handle opened with O_APPEND: what the mount itself answers.

    Such a handle bypasses the kernel's page cache (direct I/O), whose copy of
    the file may still hold an append where the kernel believed the end was
    until the mount's invalidation reaches it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_APPEND)
    try:
        parts = []
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def _check_lines(data: bytes, regions: str, count: int | None) -> None:
    """Every line whole and once; each region's lines in its order (all `count` of them)."""
    assert b"\0" not in data, "a gap: bytes no append wrote"
    lines = data.splitlines(keepends=True)
    assert len(lines) == len(set(lines)), "a line appears twice"
    for r in regions:
        mine = [ln for ln in lines if ln.startswith(r.encode() + b" ")]
        if count is None:
            assert mine == [_line(r, i) for i in range(len(mine))]
        else:
            assert mine == [_line(r, i) for i in range(count)]
    assert sum(len(ln) for ln in lines) == len(data)


@pytest.mark.parametrize("n", [2, 3])
def test_concurrent_appenders_in_every_region_lose_no_line(
    mount_factory: MountFactory, journal_url: str, journal_volume: str, tmp_path: Path, n: int
) -> None:
    mounts = _regions(mount_factory, journal_url, journal_volume, tmp_path, n)
    per_region = 40
    (mounts[0].path / "app.log").write_bytes(b"")
    _sync(mounts)

    def appender(m: TidefsMount) -> Callable[[], None]:
        def run() -> None:
            for i in range(per_region):
                fd = os.open(m.path / "app.log", os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, _line(m.region, i))
                finally:
                    os.close(fd)

        return run

    _run_all([appender(m) for m in mounts])
    _sync(mounts)
    # Each region's replicator copies every appended slice, whichever chunks its
    # parts landed in (the command does not say); checked before any read here,
    # which would write fetched blocks back.
    for m in mounts:
        _wait_for_local_blocks(m, tmp_path / f"store-{m.region}")
    contents = [(m.path / "app.log").read_bytes() for m in mounts]
    assert all(c == contents[0] for c in contents), "the regions disagree"
    _check_lines(contents[0], "abc"[:n], per_region)
    assert os.stat(mounts[-1].path / "app.log").st_size == len(contents[0])


def _wait_for_local_blocks(m: TidefsMount, store_dir: Path, timeout: float = 90.0) -> None:
    state = State.open(str(m.state_dir), read_only=True)
    try:
        keys = {
            block_key(ref.slice_id, i)
            for _ino, _chunk, ref in state.iter_live_slices()
            for i in range(blocks_needed(ref))
        }
    finally:
        state.close()
    store = open_store(store_dir.as_uri())
    try:
        deadline = time.monotonic() + timeout
        missing = keys
        while missing and time.monotonic() < deadline:
            missing = {k for k in missing if not store.exists(k)}
            time.sleep(0.5)
        assert not missing, f"region {m.region} lacks {len(missing)} blocks, e.g. {min(missing)}"
    finally:
        store.close()


def test_a_writer_reads_its_own_appends_at_once_while_others_append(
    mount_factory: MountFactory, journal_url: str, journal_volume: str, tmp_path: Path
) -> None:
    a, b = _regions(mount_factory, journal_url, journal_volume, tmp_path, 2)
    (a.path / "app.log").write_bytes(b"")
    _sync([a, b])
    per_region = 30

    def writer_a() -> None:
        fd = os.open(a.path / "app.log", os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(per_region):
                os.write(fd, _line("a", i))
                if i % 7 == 6:
                    os.fsync(fd)  # some appends folded (and moved), some still buffered
                seen = _read_appending(a.path / "app.log")
                _check_lines(seen, "ab", None)
                mine = [ln for ln in seen.splitlines(keepends=True) if ln.startswith(b"a ")]
                assert len(mine) == i + 1, f"after append {i} the writer sees {len(mine)}"
        finally:
            os.close(fd)

    def writer_b() -> None:
        for i in range(per_region):
            with open(b.path / "app.log", "ab") as f:
                f.write(_line("b", i))

    _run_all([writer_a, writer_b])
    _sync([a, b])
    final_a = (a.path / "app.log").read_bytes()
    assert final_a == (b.path / "app.log").read_bytes()
    _check_lines(final_a, "ab", per_region)


def test_a_mount_refuses_a_state_of_the_previous_key_format_in_one_line(
    mount_factory: MountFactory,
) -> None:
    from tidefs.replica import keys as K
    from tidefs.replica.state import State

    m = mount_factory()
    (m.path / "f").write_bytes(b"x")
    m.stop()
    with State.open(m.state_dir) as state:
        state._db.put(K.META_FORMAT, K.encode_u32(K.FORMAT_VERSION - 1))
    with pytest.raises(RuntimeError) as failed:
        m.start()
    assert "has key format 2; this tidefs reads format 3: replay it into a new directory" in str(
        failed.value
    )
    assert "Traceback" not in str(failed.value)
