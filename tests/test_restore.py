"""Restore: a deleted tree comes back, byte for byte, with its modes, links and xattrs.

The tree is written through Replicas with real blocks in real stores, deleted,
and restored from the log into a new path by appending new commands; the
restored tree is then read back through the blocks and compared with the
tree as it was. Runs on both log backends and both store kinds, and as the
real CLI killed with SIGKILL at random points and run again.
"""

from __future__ import annotations

import functools
import random
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.test_snapshot import (  # noqa: F401 - ops_volume is a fixture
    BS,
    CHUNK,
    OpsVolume,
    data,
    kill_during,
    ops_volume,
    read_file,
    run_cli,
    timed_run,
)
from tidefs.journal.commands import (
    ROOT_INODE,
    Link,
    Mkdir,
    Mknod,
    Reclaim,
    Rmdir,
    SetAttr,
    SetXattr,
    Symlink,
    Unlink,
)
from tidefs.journal.log import open_log
from tidefs.replica.blocks import block_key
from tidefs.replica.restore import RESTORE_PREFIX, RestoreError, restore, split_path
from tidefs.replica.snapshot import create_snapshot, volume_from_log
from tidefs.replica.state import State

T0 = 1_600_000_000_000_000_000


def build_tree(vol: OpsVolume) -> dict[str, int]:
    """Make /proj: files over several chunks with overwrites, holes and truncates, links, xattrs."""
    proj = vol.mkdir(ROOT_INODE, b"proj", 0o750)
    sub = vol.mkdir(proj, b"sub", 0o700)
    deep = vol.mkdir(sub, b"deep")
    a = vol.mkfile(proj, b"a.bin", data(3 * BS + 100, 1), mode=0o640)
    vol.write(a, CHUNK - 100, data(300, 2))  # across a chunk boundary
    vol.write(a, 2 * CHUNK + 10, data(2 * BS, 3))
    vol.submit(SetAttr(a, size=2 * CHUNK + BS))  # cuts the last slice
    vol.submit(SetAttr(a, size=3 * CHUNK + 5))  # a hole at the end
    vol.write(a, 10, data(50, 4))
    b = vol.mkfile(sub, b"b.txt", b"hello, tidefs\n")
    vol.mkfile(proj, b"empty", mode=0o600)
    c = vol.mkfile(deep, b"c", data(BS + 1, 5))
    vol.submit(Link(a, sub, b"hl"))
    vol.submit(Link(a, ROOT_INODE, b"outside"))  # a name outside the tree
    vol.submit(Link(b, deep, b"hl2"))
    ln = vol.submit(Symlink(sub, b"ln", b"../a.bin", 1000, 1000)).inode
    fifo = vol.submit(Mknod(sub, b"fifo", stat.S_IFIFO | 0o644, 1000, 1000)).inode
    vol.submit(SetXattr(a, b"user.k", b"v" * 100))
    vol.submit(SetXattr(proj, b"user.tag", b"proj"))
    vol.submit(SetXattr(ln, b"user.l", b""))
    vol.submit(SetAttr(c, uid=7, gid=8, mode=0o4755))
    vol.submit(SetAttr(fifo, atime=T0, mtime=T0 + 1))
    vol.submit(SetAttr(ln, mtime=T0 + 2))
    vol.submit(SetAttr(deep, mode=0o2775, mtime=T0 + 3))
    return {"proj": proj, "a": a, "b": b}


def tree(vol: OpsVolume, state: State, root: int) -> tuple[dict[str, Any], list[list[str]]]:
    """Describe the tree at `root`: every node's attributes and bytes, and its hard-link groups."""
    nodes: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}

    def walk(ino: int, path: str) -> None:
        a = state.getattr(ino)
        assert a is not None
        xattrs = {n: state.getxattr(ino, n) for n in state.listxattr(ino)}
        body: Any = None
        if a.is_reg:
            body = read_file(state, ino, vol.stores)
            inodes.setdefault(ino, []).append(path)
        elif a.is_symlink:
            body = state.readlink(ino)
        times = (a.mtime_ns, a.atime_ns)
        nodes[path] = (a.mode, a.uid, a.gid, a.size, a.rdev, times, xattrs, body)
        if a.is_dir:
            for _cookie, name, child in state.readdir(ino):
                walk(child, f"{path}/{name.decode()}")

    walk(root, "")
    groups = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    return nodes, groups


def delete_tree(vol: OpsVolume, parent: int, name: bytes) -> None:
    """Remove `parent/name` and everything under it, reclaiming the unlinked inodes."""
    state = vol.state()
    ino = state.lookup(parent, name)
    assert ino is not None
    attr = state.getattr(ino)
    assert attr is not None
    if attr.is_dir:
        for _c, child_name, _child in list(state.readdir(ino)):
            delete_tree(vol, ino, child_name)
        vol.submit(Rmdir(parent, name))
        return
    vol.submit(Unlink(parent, name))
    after = state.getattr(ino)
    if after is not None and after.nlink == 0:
        vol.submit(Reclaim(ino))


@pytest.fixture
def two_regions(
    ops_volume: Callable[..., OpsVolume],  # noqa: F811 - the fixture imported above
    store_url: str,
    tmp_path: Path,
) -> OpsVolume:
    """A volume whose region a stores in each store kind, region b in a directory."""
    return ops_volume({"a": store_url, "b": (tmp_path / "store-b").as_uri()})


def test_restore_a_deleted_tree(two_regions: OpsVolume, tmp_path: Path) -> None:
    vol = two_regions
    ids = build_tree(vol)
    lg = vol.open_log()
    create_snapshot(lg, vol.stores, volume=vol.name, region="b")  # a restore starts from it
    vol.submit(SetAttr(ids["b"], mtime=T0 + 9))
    target = vol.sync()
    want = tree(vol, vol.state(), ids["proj"])
    run = functools.partial(restore, lg, vol.stores, volume=vol.name, target=target)
    assert want[1] == [["/a.bin", "/sub/hl"], ["/sub/b.txt", "/sub/deep/hl2"]]

    delete_tree(vol, ROOT_INODE, b"proj")
    vol.mkfile(vol.mkdir(ROOT_INODE, b"proj"), b"other", data(10, 9))  # a new tree of that name
    assert vol.state().lookup(ROOT_INODE, b"proj") != ids["proj"]

    result = run(source="/proj", dest="/proj.restored", work_dir=tmp_path / "w1", region="b")
    assert not result.already and result.entries == len(want[0])
    vol.sync("a")
    vol.sync("b")
    for region in ("a", "b"):
        state = vol.state(region)
        restored = state.lookup(ROOT_INODE, b"proj.restored")
        assert restored == result.inode
        assert tree(vol, state, restored) == want
        a = state.lookup(restored, b"a.bin")
        assert a is not None and state.getattr(a).nlink == 2  # type: ignore[union-attr]
        assert not [n for _c, n, _i in state.readdir(ROOT_INODE) if n.startswith(RESTORE_PREFIX)]
    assert vol.state("a").digest() == vol.state("b").digest()

    # Again: nothing to do, it says so.
    again = run(source="/proj", dest="/proj.restored", work_dir=tmp_path / "w2")
    assert again.already and again.commands == 0

    with pytest.raises(RestoreError, match="exists"):
        run(source="/proj", dest="/proj", work_dir=tmp_path / "w3")
    with pytest.raises(RestoreError, match="did not exist"):
        run(source="/nope", dest="/x", work_dir=tmp_path / "w4")
    far = time.time_ns() + 30 * 86400 * 10**9  # the target left the 7-day window by then
    with pytest.raises(RestoreError, match="older than the volume's retention"):
        run(source="/proj", dest="/x", work_dir=tmp_path / "w5", now_ns=far)
    # A single file comes back on its own too.
    run(source="/proj/sub/b.txt", dest="/b.txt", work_dir=tmp_path / "w6")
    vol.sync()
    b = vol.state().lookup(ROOT_INODE, b"b.txt")
    assert b is not None and read_file(vol.state(), b, vol.stores) == b"hello, tidefs\n"


def test_restore_refuses_when_a_block_is_gone(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'log.db'}"
    vol = OpsVolume.create(url, "vol", tmp_path, {"a": (tmp_path / "sa").as_uri()})
    try:
        ids = build_tree(vol)
        target = vol.sync()
        first = vol.state().slices(ids["a"], 0)[0]
        delete_tree(vol, ROOT_INODE, b"proj")
        vol.stores["a"].delete(block_key(first.slice_id, 1))
        with pytest.raises(RestoreError, match="in no region's store"):
            restore(
                vol.open_log(),
                vol.stores,
                volume="vol",
                source="/proj",
                dest="/back",
                target=target,
                work_dir=tmp_path / "w",
            )
        assert split_path("/a//b/./c") == [b"a", b"b", b"c"]
        with pytest.raises(RestoreError):
            split_path("relative")
    finally:
        vol.close()


def test_restore_cli_survives_sigkill(tmp_path: Path) -> None:
    """`tidefs restore` killed at random points, then run again, leaves exactly the tree."""
    url = f"sqlite://{tmp_path / 'log.db'}"
    urls = {"a": (tmp_path / "sa").as_uri(), "b": (tmp_path / "sb").as_uri()}
    vol = OpsVolume.create(url, "vol", tmp_path, urls)
    try:
        ids = build_tree(vol)
        extra = vol.mkdir(ids["proj"], b"more")
        for i in range(80):
            vol.mkfile(extra, b"f%02d" % i, data(100 + i, i))
        target = vol.sync()
        want = tree(vol, vol.state(), ids["proj"])
        delete_tree(vol, ROOT_INODE, b"proj")
        lg = vol.open_log()
        common = ["vol", "--journal", url, "--offset", str(target), "--path", "/proj", "-q"]
        common += ["--work-dir", str(tmp_path)]
        before = lg.head()
        took = timed_run("restore", *common, "--to", "/measure")
        commands = lg.head() - before  # what one whole restore appends
        rng = random.Random(2)
        killed = midway = 0
        for attempt in range(6):
            start = lg.head()
            if attempt % 2:
                # Kill after a random number of this run's commands landed in the log;
                # few enough that six runs cannot finish the job.
                k = rng.randrange(1, commands // 6)

                def landed(s: int = start, k: int = k) -> bool:
                    return lg.head() >= s + k

                code = kill_during(["restore", *common, "--to", "/back"], 60.0, landed)
            else:
                code = kill_during(
                    ["restore", *common, "--to", "/back"], rng.uniform(0.2, 0.6) * took
                )
            killed += code is None
            midway += code is None and lg.head() > start
        assert killed >= 3 and midway >= 2
        out = run_cli("restore", *common, "--to", "/back", "--json")
        assert '"already"' in out.stdout
        vol.sync()
        state = vol.state()
        back = state.lookup(ROOT_INODE, b"back")
        assert back is not None
        assert tree(vol, state, back) == want
        assert not [n for _c, n, _i in state.readdir(ROOT_INODE) if n.startswith(RESTORE_PREFIX)]
        assert state.orphans() == []  # partial files were reclaimed, not left behind
        again = run_cli("restore", *common, "--to", "/back")
        assert "already restored" in again.stdout
        other = [a if a != "/proj" else "/proj/sub" for a in common]
        refused = run_cli("restore", *other, "--to", "/back", check=False)
        assert refused.returncode == 1 and "exists" in refused.stderr
    finally:
        vol.close()


def test_retention_is_a_volume_setting_and_restore_refuses_older_points(tmp_path: Path) -> None:
    """`format --retention` defaults to 7 days; `tidefs restore --offset|--at` refuses older states."""
    url = f"sqlite://{tmp_path / 'log.db'}"
    store = (tmp_path / "s").as_uri()
    run_cli("format", "plain", "--journal", url, "--region", f"a={store}")
    run_cli("format", "short", "--journal", url, "--region", f"a={store}", "--retention", "1h")
    for name, retention in (("plain", 7 * 86400), ("short", 3600)):
        with open_log(url, name) as lg:
            assert volume_from_log(lg).retention_s == retention

    # A volume with the default retention whose history reaches back ten days.
    day = 86400 * 10**9
    now = time.time_ns()
    vol = OpsVolume.create(url, "vol", tmp_path, {"a": store}, timestamp_ns=now - 10 * day)
    try:
        for name, age in ((b"d1", 10), (b"d2", 9), (b"d3", 1)):
            vol.submit(Mkdir(ROOT_INODE, name, 0o755, 0, 0), timestamp_ns=now - age * day)
        vol.submit(Rmdir(ROOT_INODE, b"d1"))
        # The state at offset 1 (d1 made) ended 9 days ago, when offset 2 was appended: gc
        # may have collected its blocks. The state at offset 2 lasted until a day ago.
        common = ["vol", "--journal", url, "--path", "/d1", "-q", "--work-dir", str(tmp_path)]

        def at(days_ago: float) -> list[str]:
            when = datetime.fromtimestamp((now - days_ago * day) / 1e9, tz=UTC)
            return ["--at", when.isoformat()]

        # Offset 1, or a time 9.5 days ago (when offset 1 was the newest state): refused.
        for when in (["--offset", "1"], at(9.5)):
            refused = run_cli("restore", *common, *when, "--to", "/old", check=False)
            assert refused.returncode == 1 and refused.stdout == ""
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
            assert "older than the volume's retention of 7d" in refused.stderr
            assert "the oldest offset that can be restored now is 2" in refused.stderr
        refused = run_cli("restore", *common, *at(20), "--to", "/old", check=False)
        assert refused.returncode == 1 and "did not exist yet" in refused.stderr
        # Five days ago the newest state was offset 2. Without -q, progress goes to stderr.
        loud = run_cli("restore", *[a for a in common if a != "-q"], *at(5), "--to", "/back")
        assert "entries restored: 1/1" in loud.stderr, loud.stderr
        assert "restored /d1 as of offset 2 to /back" in loud.stdout
        vol.sync()
        assert vol.state().lookup(ROOT_INODE, b"old") is None
        assert vol.state().lookup(ROOT_INODE, b"back") is not None
    finally:
        vol.close()


def test_restore_refuses_a_time_in_the_future(tmp_path: Path) -> None:
    """`--at` a time still to come is refused like `--offset` beyond the head: nothing restored."""
    url = f"sqlite://{tmp_path / 'log.db'}"
    vol = OpsVolume.create(url, "vol", tmp_path, {"a": (tmp_path / "sa").as_uri()})
    try:
        vol.mkdir(ROOT_INODE, b"d")
        head = vol.open_log().head()
        common = ["vol", "--journal", url, "--path", "/d", "-q", "--work-dir", str(tmp_path)]
        tomorrow = datetime.fromtimestamp(time.time() + 86400, tz=UTC).isoformat()
        for when, message in (
            (["--offset", str(head)], f"offset {head} is not in the log of vol (head {head})"),
            (["--at", tomorrow], f"{tomorrow} is in the future, past the log of vol (head {head})"),
        ):
            refused = run_cli("restore", *common, *when, "--to", "/back", check=False)
            assert refused.returncode == 1 and refused.stdout == "", refused
            lines = refused.stderr.strip().splitlines()
            assert len(lines) == 1 and message in lines[0], refused.stderr
        assert vol.open_log().head() == head  # no command appended
        vol.sync()
        assert vol.state().lookup(ROOT_INODE, b"back") is None
        # A time after the last record but already past restores the head's tree.
        now = datetime.fromtimestamp(time.time(), tz=UTC).isoformat()
        done = run_cli("restore", *common, "--at", now, "--to", "/back")
        assert f"as of offset {head - 1} to /back" in done.stdout
    finally:
        vol.close()
