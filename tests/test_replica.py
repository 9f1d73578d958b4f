"""Replicas of one volume on both log backends: read-your-writes, convergence, stops, retries."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest

from tidefs.journal import codec
from tidefs.journal.commands import (
    ROOT_INODE,
    CreateVolume,
    Mkdir,
    Mknod,
    Region,
    Rename,
    Unlink,
    new_request_id,
)
from tidefs.journal.log import open_log
from tidefs.replica.replica import FoldStopped, Replica, fold_range
from tidefs.replica.state import State

REGIONS = (Region("a", "file:///unused-a"), Region("b", "file:///unused-b"))


def make_replica(url: str, volume: str, state_dir: Path, region: str) -> Replica:
    return Replica(open_log(url, volume), State.open(state_dir), region).start()


def close(*replicas: Replica) -> None:
    for r in replicas:
        r.stop()
        r.state.close()
        r.log.close()


def tree(state: State, ino: int = ROOT_INODE, prefix: bytes = b"") -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for _cookie, name, child in state.readdir(ino):
        attr = state.getattr(child)
        assert attr is not None
        out[prefix + name] = attr.mode
        if attr.mode & 0o170000 == 0o040000:
            out.update(tree(state, child, prefix + name + b"/"))
    return out


def test_two_regions_converge_with_read_your_writes(
    journal_url: str, journal_volume: str, tmp_path: Path
) -> None:
    a = make_replica(journal_url, journal_volume, tmp_path / "a", "a")
    b = make_replica(journal_url, journal_volume, tmp_path / "b", "b")
    try:
        assert a.submit(CreateVolume(name=journal_volume, regions=REGIONS, primary="a")).ok
        out = a.submit(Mkdir(ROOT_INODE, b"data", 0o40755, 0, 0))
        assert out.ok
        # Read-your-writes: the writer's own state has the directory on return.
        assert a.state.lookup(ROOT_INODE, b"data") == out.inode

        # Concurrent writers in both regions on the same directory.
        def work(r: Replica, tag: bytes) -> None:
            for i in range(40):
                name = tag + b"%d" % i
                assert r.submit(Mknod(out.inode, name, 0o100644, 0, 0)).ok
                if i % 3 == 0:
                    r.submit(Rename(out.inode, name, out.inode, name + b".x"))
                if i % 5 == 0:
                    r.submit(Unlink(out.inode, name + b".x"))

        threads = [threading.Thread(target=work, args=(r, t)) for r, t in ((a, b"a"), (b, b"b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        target = b.barrier(timeout=30)
        a.wait_applied(target, timeout=30)
        assert a.state.applied_offset() == b.state.applied_offset()
        assert a.state.digest() == b.state.digest()
        ta, tb = tree(a.state), tree(b.state)
        assert ta == tb
        unlinked = len([i for i in range(40) if i % 15 == 0])  # renamed, then unlinked
        assert len(ta) == 1 + 2 * (40 - unlinked)
    finally:
        close(a, b)


def test_a_retried_request_takes_effect_once(
    journal_url: str, journal_volume: str, tmp_path: Path
) -> None:
    a = make_replica(journal_url, journal_volume, tmp_path / "a", "a")
    try:
        a.submit(CreateVolume(name=journal_volume, regions=REGIONS, primary="a"))
        rid = new_request_id()
        first = a.submit(Mknod(ROOT_INODE, b"f", 0o100644, 0, 0), request_id=rid)
        again = a.submit(Mknod(ROOT_INODE, b"f", 0o100644, 0, 0), request_id=rid)
        assert first.ok and again == first  # not EEXIST: the retry is the same command
        fresh = a.submit(Mknod(ROOT_INODE, b"f", 0o100644, 0, 0))
        assert fresh.errno == errno.EEXIST
    finally:
        close(a)


def test_fold_stops_at_a_schema_from_the_future(
    journal_url: str, journal_volume: str, tmp_path: Path
) -> None:
    a = make_replica(journal_url, journal_volume, tmp_path / "a", "a")
    try:
        a.submit(CreateVolume(name=journal_volume, regions=REGIONS, primary="a"))
        a.submit(Mkdir(ROOT_INODE, b"d", 0o40755, 0, 0))
        before = (a.state.applied_offset(), a.state.digest())
        future = codec.MARKER + bytes.fromhex("00112233445566ff") + b"\x00\x00"
        a.log.append(future)
        with pytest.raises(FoldStopped, match="00112233445566ff"):
            a.submit(Mkdir(ROOT_INODE, b"e", 0o40755, 0, 0), timeout=10)
        assert (a.state.applied_offset(), a.state.digest()) == before
    finally:
        close(a)


def test_fold_range_rebuilds_the_same_state(
    journal_url: str, journal_volume: str, tmp_path: Path
) -> None:
    a = make_replica(journal_url, journal_volume, tmp_path / "a", "a")
    try:
        a.submit(CreateVolume(name=journal_volume, regions=REGIONS, primary="a"))
        for i in range(30):
            a.submit(Mkdir(ROOT_INODE, b"d%d" % i, 0o40755, 0, 0))
        with open_log(journal_url, journal_volume) as lg:
            rebuilt = State.open(tmp_path / "r")
            seen: list[int] = []
            final = fold_range(lg, rebuilt, batch=7, progress=lambda now, _t: seen.append(now))
            assert final == a.state.applied_offset()
            assert rebuilt.digest() == a.state.digest()
            assert seen == sorted(seen) and seen[-1] == final
            rebuilt.close()
    finally:
        close(a)
