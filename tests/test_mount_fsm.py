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
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

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
