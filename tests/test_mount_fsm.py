"""Random sequences of file operations on a mount and on a local directory (parsec's pattern).

A hypothesis state machine applies each operation to a tree in the mount and
to the same tree in a local directory, and expects the same result or the
same errno every time; after each step both trees must look the same. Names
come from a tiny alphabet so that operations collide: renames over existing
entries, rmdir of non-empty directories, links to directories, and so on.
Symlink targets stay inside the tree, so that no operation follows a link out
of it (into the rest of the mount, or of the machine).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.harness.mount import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    TidefsMount,
    outcome,
    renameat2,
    snapshot,
)

pytestmark = pytest.mark.fuse

NAMES = ["a", "b", "c"]
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
data = st.binary(max_size=200)
offsets = st.integers(0, 300)


def write(p: Path, off: int, buf: bytes) -> int:
    fd = os.open(p, os.O_WRONLY)
    try:
        return os.pwrite(fd, buf, off)
    finally:
        os.close(fd)


def create(p: Path, excl: bool) -> None:
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY | (os.O_EXCL if excl else 0), 0o644))


class FileOperations(RuleBasedStateMachine):
    """The same operation on the mount and on the oracle; same result or same errno."""

    mount: TidefsMount
    counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        n = next(self.counter)
        self.mine = self.mount.path / f"fsm{n}"
        self._oracle_dir = tempfile.TemporaryDirectory(prefix="tidefs-oracle-")
        self.oracle = Path(self._oracle_dir.name) / f"fsm{n}"
        self.mine.mkdir()
        self.oracle.mkdir()

    def teardown(self) -> None:
        self._oracle_dir.cleanup()

    def same(self, op: Any) -> None:
        expected = outcome(lambda: op(self.oracle))
        actual = outcome(lambda: op(self.mine))
        assert actual == expected

    @rule(p=paths)
    def mkdir(self, p: str) -> None:
        self.same(lambda b: os.mkdir(b / p))

    @rule(p=paths, excl=st.booleans())
    def create(self, p: str, excl: bool) -> None:
        self.same(lambda b: create(b / p, excl))

    @rule(p=paths, off=offsets, buf=data)
    def write(self, p: str, off: int, buf: bytes) -> None:
        self.same(lambda b: write(b / p, off, buf))

    @rule(p=paths, size=offsets)
    def truncate(self, p: str, size: int) -> None:
        self.same(lambda b: os.truncate(b / p, size))

    @rule(p=paths)
    def read(self, p: str) -> None:
        self.same(lambda b: (b / p).read_bytes())

    @rule(p=paths)
    def listdir(self, p: str) -> None:
        self.same(lambda b: os.listdir(b / p))

    @rule(p=paths)
    def stat(self, p: str) -> None:
        self.same(lambda b: os.lstat(b / p))

    @rule(p=paths)
    def unlink(self, p: str) -> None:
        self.same(lambda b: os.unlink(b / p))

    @rule(p=paths)
    def rmdir(self, p: str) -> None:
        self.same(lambda b: os.rmdir(b / p))

    @rule(src=paths, dst=paths, flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, src: str, dst: str, flags: int) -> None:
        self.same(lambda b: renameat2(b / src, b / dst, flags))

    @rule(src=paths, dst=paths)
    def link(self, src: str, dst: str) -> None:
        self.same(lambda b: os.link(b / src, b / dst, follow_symlinks=False))

    @rule(dest=st.sampled_from([*NAMES, "a/b", "b/../c", "missing"]), p=paths)
    def symlink(self, dest: str, p: str) -> None:
        self.same(lambda b: os.symlink(dest, b / p))

    @rule(p=paths, mode=st.sampled_from([0o700, 0o644, 0o1777, 0o2755, 0o4755]))
    def chmod(self, p: str, mode: int) -> None:
        self.same(lambda b: os.chmod(b / p, mode))

    @rule(p=paths, value=st.binary(max_size=20))
    def setxattr(self, p: str, value: bytes) -> None:
        self.same(lambda b: os.setxattr(b / p, "user.t", value, follow_symlinks=False))

    @invariant()
    def trees_agree(self) -> None:
        assert snapshot(self.mine) == snapshot(self.oracle)


def test_file_operations_state_machine(shared_mount: TidefsMount) -> None:
    FileOperations.mount = shared_mount
    run_state_machine_as_test(
        FileOperations,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- times and data through open handles, against tmpfs ---------------------------------

EXPLICIT_MAX_NS = 1_262_304_000 * 10**9  # 2010-01-01: every explicit time lies before it
explicit_times = st.integers(315_532_800 * 10**9, EXPLICIT_MAX_NS - 1)  # 1980-2009, in ns
FILES = ["f", "g"]
HANDLES = 3


def mtime_view(ns: int) -> int | str:
    """An explicitly set mtime as it is; one set by the clock (a write, UTIME_NOW) as "now"."""
    return ns if ns < EXPLICIT_MAX_NS else "now"


class TimesAndHandles(RuleBasedStateMachine):
    """Writes through open handles interleaved with utimens, futimens, fsync, close, remount.

    tmpfs is the oracle: after each step both trees hold the same bytes and
    the same mtimes, where a time set explicitly (in the past) must be equal
    and a time set by the clock (a write, UTIME_NOW) is "now" on both.
    """

    mount: TidefsMount
    counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        n = next(self.counter)
        self.mine = self.mount.path / f"times{n}"
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._oracle_dir = tempfile.TemporaryDirectory(prefix="tidefs-oracle-", dir=shm)
        self.oracle = Path(self._oracle_dir.name) / f"times{n}"
        self.mine.mkdir()
        self.oracle.mkdir()
        self.handles: list[tuple[int, int]] = []  # (fd in the mount, fd in the oracle)

    def teardown(self) -> None:
        self._close_all()
        self._oracle_dir.cleanup()

    def _close_all(self) -> None:
        for mine, theirs in self.handles:
            os.close(mine)
            os.close(theirs)
        self.handles.clear()

    def both(self, op: Any) -> None:
        assert outcome(lambda: op(self.mine)) == outcome(lambda: op(self.oracle))

    @initialize()
    def open_first(self) -> None:
        self.open(FILES[0])

    @rule(name=st.sampled_from(FILES))
    def open(self, name: str) -> None:
        if len(self.handles) >= HANDLES:
            return
        flags = os.O_RDWR | os.O_CREAT
        self.handles.append((os.open(self.mine / name, flags), os.open(self.oracle / name, flags)))

    @rule(h=st.integers(0, HANDLES - 1), off=offsets, buf=st.binary(min_size=1, max_size=200))
    def write(self, h: int, off: int, buf: bytes) -> None:
        if self.handles:
            for fd in self.handles[h % len(self.handles)]:
                assert os.pwrite(fd, buf, off) == len(buf)

    @rule(h=st.integers(0, HANDLES - 1), t=explicit_times)
    def futimens(self, h: int, t: int) -> None:
        if self.handles:
            for fd in self.handles[h % len(self.handles)]:
                os.utime(fd, ns=(t, t))

    @rule(name=st.sampled_from(FILES), t=st.one_of(explicit_times, st.none()))
    def utimens(self, name: str, t: int | None) -> None:
        self.both(lambda b: os.utime(b / name) if t is None else os.utime(b / name, ns=(t, t)))

    @rule(h=st.integers(0, HANDLES - 1), size=offsets)
    def ftruncate(self, h: int, size: int) -> None:
        if self.handles:
            pair = self.handles[h % len(self.handles)]
            if os.fstat(pair[1]).st_size == size:
                return  # tmpfs marks mtime even then, tidefs only on a change of size
            for fd in pair:
                os.ftruncate(fd, size)

    @rule(h=st.integers(0, HANDLES - 1))
    def fsync(self, h: int) -> None:
        if self.handles:
            os.fsync(self.handles[h % len(self.handles)][0])

    @rule(h=st.integers(0, HANDLES - 1))
    def close(self, h: int) -> None:
        if self.handles:
            for fd in self.handles.pop(h % len(self.handles)):
                os.close(fd)

    @rule(now=st.integers(0, 3))
    def remount(self, now: int) -> None:
        if now == 0:  # a remount costs a second or two: one draw in four does it
            self._close_all()
            self.mount.remount()

    def _held(self, name: str) -> tuple[int, int] | None:
        """A handle open on `name`: reading through it flushes nothing (a close would)."""
        for pair in self.handles:
            if os.stat(self.mine / name).st_ino == os.fstat(pair[0]).st_ino:
                return pair
        return None

    @invariant()
    def same_bytes_and_times(self) -> None:
        for name in FILES:
            if not (self.oracle / name).exists():
                assert not (self.mine / name).exists()
                continue
            held = self._held(name)
            views = []
            for i, b in enumerate((self.mine, self.oracle)):
                when = mtime_view(os.stat(b / name).st_mtime_ns)
                if held is not None:
                    data = os.pread(held[i], 1 << 16, 0)
                else:
                    data = (b / name).read_bytes()
                views.append((data, when))
            assert views[0] == views[1], name


def test_times_and_handles_state_machine(tidefs_mount: TidefsMount) -> None:
    TimesAndHandles.mount = tidefs_mount
    run_state_machine_as_test(
        TimesAndHandles,
        settings=settings(
            max_examples=25,
            stateful_step_count=20,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
