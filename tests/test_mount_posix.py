# mypy: disable-error-code="func-returns-value"
"""POSIX behaviour of a mount, checked against a local directory as the oracle.

Every case runs one call on a fresh tree in the mount and on the same tree in a
local directory, and expects the same value or the same errno, and the same
tree afterwards. Cases that need an unprivileged caller run in a child process
that drops to `nobody` after entering the tree (so that the paths above it need
not be open to everyone).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.mount import (
    NOBODY,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    TidefsMount,
    outcome,
    renameat2,
    run_as,
    snapshot,
)

pytestmark = pytest.mark.fuse

_case = itertools.count()


def build(base: Path) -> None:
    """The tree every case starts from."""
    (base / "file").write_bytes(b"hello world")
    (base / "dir").mkdir()
    (base / "dir" / "inner").write_bytes(b"x" * 100)
    (base / "dir" / "sub").mkdir()
    (base / "emptydir").mkdir()
    (base / "empty2").mkdir()
    os.symlink("file", base / "link")
    os.symlink("nowhere", base / "dangling")


def trees(mount: TidefsMount, tmp_path: Path) -> tuple[Path, Path]:
    n = next(_case)
    mine = mount.path / f"case{n}"
    oracle = tmp_path / f"oracle{n}"
    for base in (mine, oracle):
        base.mkdir()
        build(base)
    return mine, oracle


def open_close(path: Path, flags: int, mode: int = 0o644) -> None:
    os.close(os.open(path, flags, mode))


def write_at(path: Path, off: int, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def append(path: Path, data: bytes) -> bytes:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
        os.write(fd, data)
    finally:
        os.close(fd)
    return path.read_bytes()


def trunc_open(path: Path, data: bytes) -> bytes:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return path.read_bytes()


def xattr_flags(path: Path, name: str, value: bytes, flags: int) -> list[str]:
    os.setxattr(path, name, value, flags)
    return os.listxattr(path)


Case = tuple[str, Callable[[Path], Any]]

CASES: list[Case] = [
    # lookups
    ("stat-file", lambda b: os.stat(b / "file")),
    ("stat-missing", lambda b: os.stat(b / "missing")),
    ("stat-through-file", lambda b: os.stat(b / "file" / "x")),
    ("lstat-link", lambda b: os.lstat(b / "link")),
    ("stat-link", lambda b: os.stat(b / "link")),
    ("stat-dangling", lambda b: os.stat(b / "dangling")),
    ("stat-long-name", lambda b: os.stat(b / ("n" * 256))),
    ("listdir", lambda b: os.listdir(b)),
    ("listdir-file", lambda b: os.listdir(b / "file")),
    ("listdir-missing", lambda b: os.listdir(b / "missing")),
    # mkdir
    ("mkdir", lambda b: os.mkdir(b / "new")),
    ("mkdir-mode", lambda b: (os.mkdir(b / "new", 0o1750), os.stat(b / "new"))[1]),
    ("mkdir-exists-dir", lambda b: os.mkdir(b / "dir")),
    ("mkdir-exists-file", lambda b: os.mkdir(b / "file")),
    ("mkdir-exists-link", lambda b: os.mkdir(b / "dangling")),
    ("mkdir-no-parent", lambda b: os.mkdir(b / "missing" / "x")),
    ("mkdir-parent-file", lambda b: os.mkdir(b / "file" / "x")),
    ("mkdir-long-name", lambda b: os.mkdir(b / ("n" * 256))),
    ("mkdir-255-name", lambda b: os.mkdir(b / ("n" * 255))),
    # rmdir
    ("rmdir-empty", lambda b: os.rmdir(b / "emptydir")),
    ("rmdir-notempty", lambda b: os.rmdir(b / "dir")),
    ("rmdir-file", lambda b: os.rmdir(b / "file")),
    ("rmdir-link", lambda b: os.rmdir(b / "link")),
    ("rmdir-missing", lambda b: os.rmdir(b / "missing")),
    ("rmdir-dot", lambda b: os.rmdir(b / "emptydir" / ".")),
    ("rmdir-dotdot", lambda b: os.rmdir(b / "dir" / "sub" / "..")),
    # unlink
    ("unlink-file", lambda b: os.unlink(b / "file")),
    ("unlink-dir", lambda b: os.unlink(b / "dir")),
    ("unlink-link", lambda b: os.unlink(b / "link")),
    ("unlink-missing", lambda b: os.unlink(b / "missing")),
    ("unlink-through-file", lambda b: os.unlink(b / "file" / "x")),
    # rename
    ("rename-file", lambda b: os.rename(b / "file", b / "new")),
    ("rename-file-into-dir", lambda b: os.rename(b / "file", b / "dir" / "moved")),
    ("rename-over-file", lambda b: os.rename(b / "file", b / "dir" / "inner")),
    ("rename-file-over-dir", lambda b: os.rename(b / "file", b / "emptydir")),
    ("rename-dir-over-file", lambda b: os.rename(b / "emptydir", b / "file")),
    ("rename-dir-over-empty", lambda b: os.rename(b / "dir", b / "emptydir")),
    ("rename-dir-over-nonempty", lambda b: os.rename(b / "emptydir", b / "dir")),
    ("rename-dir-into-self", lambda b: os.rename(b / "dir", b / "dir" / "sub" / "x")),
    ("rename-dir-moves", lambda b: os.rename(b / "dir", b / "emptydir" / "d")),
    ("rename-missing", lambda b: os.rename(b / "missing", b / "x")),
    ("rename-same", lambda b: os.rename(b / "file", b / "file")),
    ("rename-hardlinks", lambda b: (os.link(b / "file", b / "h"), os.rename(b / "file", b / "h"))),
    ("rename-link", lambda b: os.rename(b / "link", b / "link2")),
    ("rename-to-missing-dir", lambda b: os.rename(b / "file", b / "missing" / "x")),
    ("rename-noreplace", lambda b: renameat2(b / "file", b / "dir" / "inner", RENAME_NOREPLACE)),
    ("rename-noreplace-ok", lambda b: renameat2(b / "file", b / "new", RENAME_NOREPLACE)),
    ("rename-exchange", lambda b: renameat2(b / "file", b / "dir", RENAME_EXCHANGE)),
    ("rename-exchange-missing", lambda b: renameat2(b / "file", b / "new", RENAME_EXCHANGE)),
    ("rename-exchange-dirs", lambda b: renameat2(b / "emptydir", b / "dir/sub", RENAME_EXCHANGE)),
    ("rename-both-flags", lambda b: renameat2(b / "file", b / "x", 3)),
    # link
    ("link", lambda b: (os.link(b / "file", b / "hard"), os.stat(b / "file"))[1]),
    ("link-dir", lambda b: os.link(b / "dir", b / "hard")),
    ("link-missing", lambda b: os.link(b / "missing", b / "hard")),
    ("link-exists", lambda b: os.link(b / "file", b / "dir")),
    ("link-into-missing", lambda b: os.link(b / "file", b / "missing" / "x")),
    ("link-then-unlink", lambda b: (os.link(b / "file", b / "h"), os.unlink(b / "file"))),
    # symlink / readlink
    ("symlink", lambda b: (os.symlink("dir/inner", b / "s"), (b / "s").read_bytes())[1]),
    ("symlink-exists", lambda b: os.symlink("x", b / "file")),
    ("symlink-long-target", lambda b: os.symlink("t" * 4096, b / "s")),
    ("readlink", lambda b: os.readlink(b / "link")),
    ("readlink-file", lambda b: os.readlink(b / "file")),
    ("readlink-missing", lambda b: os.readlink(b / "missing")),
    # open / create
    ("open-missing", lambda b: open_close(b / "missing", os.O_RDONLY)),
    ("create", lambda b: (open_close(b / "new", os.O_CREAT | os.O_WRONLY), os.stat(b / "new"))[1]),
    ("create-excl-exists", lambda b: open_close(b / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
    ("create-exists", lambda b: open_close(b / "file", os.O_CREAT | os.O_WRONLY)),
    ("create-excl-dangling", lambda b: open_close(b / "dangling", os.O_CREAT | os.O_EXCL)),
    ("create-through-dangling", lambda b: open_close(b / "dangling", os.O_CREAT | os.O_WRONLY)),
    ("open-dir-write", lambda b: open_close(b / "dir", os.O_WRONLY)),
    ("open-file-directory", lambda b: open_close(b / "file", os.O_RDONLY | os.O_DIRECTORY)),
    ("open-through-file", lambda b: open_close(b / "file" / "x", os.O_RDONLY)),
    ("open-nofollow", lambda b: open_close(b / "link", os.O_RDONLY | os.O_NOFOLLOW)),
    ("create-in-missing", lambda b: open_close(b / "missing" / "x", os.O_CREAT | os.O_WRONLY)),
    ("open-trunc", lambda b: trunc_open(b / "file", b"new")),
    ("open-append", lambda b: append(b / "file", b"++")),
    # read / write
    ("read", lambda b: (b / "file").read_bytes()),
    ("write-past-end", lambda b: (write_at(b / "file", 100, b"x"), (b / "file").read_bytes())),
    ("write-overwrite", lambda b: (write_at(b / "file", 3, b"XY"), (b / "file").read_bytes())),
    ("read-dir", lambda b: (b / "dir").read_bytes()),
    # truncate
    ("truncate-down", lambda b: (os.truncate(b / "file", 4), (b / "file").read_bytes())),
    ("truncate-up", lambda b: (os.truncate(b / "file", 30), (b / "file").read_bytes())),
    ("truncate-dir", lambda b: os.truncate(b / "dir", 0)),
    ("truncate-missing", lambda b: os.truncate(b / "missing", 0)),
    ("truncate-negative", lambda b: os.truncate(b / "file", -1)),
    ("truncate-link", lambda b: (os.truncate(b / "link", 2), (b / "file").read_bytes())),
    # attributes
    ("chmod", lambda b: (os.chmod(b / "file", 0o4751), os.stat(b / "file"))[1]),
    ("chmod-dir", lambda b: (os.chmod(b / "dir", 0o1700), os.stat(b / "dir"))[1]),
    ("chmod-missing", lambda b: os.chmod(b / "missing", 0o600)),
    ("chown", lambda b: (os.chown(b / "file", 1234, 5678), os.stat(b / "file"))[1]),
    (
        "chown-clears-suid",
        lambda b: (os.chmod(b / "file", 0o6755), os.chown(b / "file", 7, 7), os.stat(b / "file"))[
            2
        ],
    ),
    ("lchown", lambda b: (os.lchown(b / "link", 3, 4), os.lstat(b / "link"))[1]),
    (
        "utime",
        lambda b: (os.utime(b / "file", ns=(10**18, 2 * 10**18)), os.stat(b / "file").st_mtime_ns)[
            1
        ],
    ),
    (
        "utime-atime",
        lambda b: (os.utime(b / "file", ns=(10**18, 2 * 10**18)), os.stat(b / "file").st_atime_ns)[
            1
        ],
    ),
    ("utime-missing", lambda b: os.utime(b / "missing")),
    ("access-w", lambda b: os.access(b / "file", os.W_OK)),
    ("access-x-file", lambda b: os.access(b / "file", os.X_OK)),
    ("access-x-dir", lambda b: os.access(b / "dir", os.X_OK)),
    # special files
    ("mkfifo", lambda b: (os.mkfifo(b / "fifo", 0o640), os.stat(b / "fifo"))[1]),
    ("mkfifo-exists", lambda b: os.mkfifo(b / "file")),
    (
        "mknod-chr",
        lambda b: (
            os.mknod(b / "c", 0o600 | stat.S_IFCHR, os.makedev(1, 3)),
            os.stat(b / "c").st_rdev,
        )[1],
    ),
    ("mknod-sock", lambda b: (os.mknod(b / "s", 0o600 | stat.S_IFSOCK), os.stat(b / "s"))[1]),
    # extended attributes
    (
        "xattr-set-get",
        lambda b: (os.setxattr(b / "file", "user.a", b"1"), os.getxattr(b / "file", "user.a"))[1],
    ),
    ("xattr-get-missing", lambda b: os.getxattr(b / "file", "user.none")),
    ("xattr-remove-missing", lambda b: os.removexattr(b / "file", "user.none")),
    (
        "xattr-list",
        lambda b: (
            os.setxattr(b / "file", "user.z", b""),
            os.setxattr(b / "file", "user.y", b"v"),
            os.listxattr(b / "file"),
        )[2],
    ),
    (
        "xattr-remove",
        lambda b: (
            os.setxattr(b / "file", "user.a", b"1"),
            os.removexattr(b / "file", "user.a"),
            os.listxattr(b / "file"),
        )[2],
    ),
    (
        "xattr-create-exists",
        lambda b: (
            os.setxattr(b / "file", "user.a", b"1"),
            xattr_flags(b / "file", "user.a", b"2", os.XATTR_CREATE),
        )[1],
    ),
    ("xattr-replace-missing", lambda b: xattr_flags(b / "file", "user.a", b"2", os.XATTR_REPLACE)),
    (
        "xattr-replace",
        lambda b: (
            os.setxattr(b / "file", "user.a", b"1"),
            xattr_flags(b / "file", "user.a", b"22", os.XATTR_REPLACE),
        )[1],
    ),
    (
        "xattr-dir",
        lambda b: (os.setxattr(b / "dir", "user.d", b"d" * 1000), os.getxattr(b / "dir", "user.d"))[
            1
        ],
    ),
    ("xattr-big", lambda b: os.setxattr(b / "file", "user.big", b"v" * 70000)),
    ("xattr-long-name", lambda b: os.setxattr(b / "file", "user." + "n" * 260, b"v")),
    (
        "xattr-symlink-user",
        lambda b: os.setxattr(b / "link", "user.a", b"v", follow_symlinks=False),
    ),
]


@pytest.mark.parametrize(("name", "op"), CASES, ids=[c[0] for c in CASES])
def test_same_as_local(
    shared_mount: TidefsMount, tmp_path: Path, name: str, op: Callable[[Path], Any]
) -> None:
    mine, oracle = trees(shared_mount, tmp_path)
    expected = outcome(lambda: op(oracle))
    assert outcome(lambda: op(mine)) == expected
    assert snapshot(mine) == snapshot(oracle)


# -- as an unprivileged user -----------------------------------------------------


def as_user(base: Path, fn: Callable[[Path], Any], uid: int = NOBODY, gid: int = NOBODY) -> Any:
    """Run `fn(Path("."))` inside `base` as uid/gid in a child process; return its outcome."""
    return run_as(lambda: outcome(lambda: fn(Path("."))), uid, gid, cwd=base)


def prepare_shared(b: Path) -> None:
    """Root's part of the permission cases: who owns what, with which bits."""
    os.chmod(b, 0o755)
    (b / "open").mkdir(mode=0o777)
    os.chmod(b / "open", 0o777)
    (b / "sticky").mkdir()
    os.chmod(b / "sticky", 0o1777)
    (b / "sticky" / "roots").write_bytes(b"r")
    (b / "sticky" / "mine").write_bytes(b"m")
    os.chown(b / "sticky" / "mine", NOBODY, NOBODY)
    (b / "suid").write_bytes(b"s")
    os.chmod(b / "suid", 0o6777)
    (b / "private").write_bytes(b"p")
    os.chmod(b / "private", 0o600)
    (b / "setgid").mkdir()
    os.chown(b / "setgid", 0, 4321)
    os.chmod(b / "setgid", 0o2777)
    (b / "owned").write_bytes(b"o")
    os.chown(b / "owned", NOBODY, NOBODY)


def write_keep(path: Path, data: bytes) -> Any:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return os.stat(path)


USER_CASES: list[Case] = [
    ("read-private", lambda b: (b / "private").read_bytes()),
    ("write-private", lambda b: write_keep(b / "private", b"x")),
    ("create-in-root-dir", lambda b: open_close(b / "new", os.O_CREAT | os.O_WRONLY)),
    (
        "create-in-open-dir",
        lambda b: (
            open_close(b / "open" / "n", os.O_CREAT | os.O_WRONLY),
            os.stat(b / "open" / "n"),
        )[1],
    ),
    ("mkdir-in-open-dir", lambda b: (os.mkdir(b / "open" / "d"), os.stat(b / "open" / "d"))[1]),
    ("sticky-unlink-other", lambda b: os.unlink(b / "sticky" / "roots")),
    ("sticky-unlink-own", lambda b: os.unlink(b / "sticky" / "mine")),
    ("sticky-rename-other", lambda b: os.rename(b / "sticky" / "roots", b / "sticky" / "x")),
    ("write-clears-suid", lambda b: write_keep(b / "suid", b"x")),
    ("truncate-clears-suid", lambda b: (os.truncate(b / "suid", 0), os.stat(b / "suid"))[1]),
    ("chmod-not-owner", lambda b: os.chmod(b / "private", 0o777)),
    ("chmod-owner", lambda b: (os.chmod(b / "owned", 0o4700), os.stat(b / "owned"))[1]),
    ("chown-not-root", lambda b: os.chown(b / "owned", 0, 0)),
    ("utime-explicit-not-owner", lambda b: os.utime(b / "suid", ns=(1, 1))),
    ("utime-now-writable", lambda b: os.utime(b / "suid")),
    ("utime-now-not-writable", lambda b: os.utime(b / "private")),
    (
        "setgid-create",
        lambda b: (
            open_close(b / "setgid" / "f", os.O_CREAT | os.O_WRONLY),
            os.stat(b / "setgid" / "f"),
        )[1],
    ),
    ("setgid-mkdir", lambda b: (os.mkdir(b / "setgid" / "d"), os.stat(b / "setgid" / "d"))[1]),
    (
        "setgid-chmod-sgid-not-member",
        lambda b: (os.chmod(b / "owned", 0o2755), os.stat(b / "owned"))[1],
    ),
    ("xattr-user-not-owner", lambda b: os.setxattr(b / "private", "user.a", b"1")),
    (
        "access-private",
        lambda b: (os.access(b / "private", os.R_OK), os.access(b / "owned", os.W_OK)),
    ),
]


@pytest.mark.parametrize(("name", "op"), USER_CASES, ids=[c[0] for c in USER_CASES])
def test_same_as_local_unprivileged(
    shared_mount: TidefsMount, tmp_path: Path, name: str, op: Callable[[Path], Any]
) -> None:
    mine, oracle = trees(shared_mount, tmp_path)
    for b in (mine, oracle):
        prepare_shared(b)
    expected = as_user(oracle, op)
    assert as_user(mine, op) == expected
    assert snapshot(mine) == snapshot(oracle)


def test_root_creates_in_setgid_dir(shared_mount: TidefsMount, tmp_path: Path) -> None:
    mine, oracle = trees(shared_mount, tmp_path)
    views = []
    for b in (mine, oracle):
        prepare_shared(b)
        (b / "setgid" / "f").write_bytes(b"")
        (b / "setgid" / "d").mkdir(mode=0o755)
        os.symlink("f", b / "setgid" / "l")
        os.mkfifo(b / "setgid" / "p")
        views.append(snapshot(b / "setgid"))
    assert views[0] == views[1]
    assert os.stat(mine / "setgid" / "d").st_mode & stat.S_ISGID


# -- timestamps ------------------------------------------------------------------


def times(paths: list[Path]) -> list[tuple[int, int]]:
    return [(os.lstat(p).st_mtime_ns, os.lstat(p).st_ctime_ns) for p in paths]


TIME_CASES: list[tuple[str, Callable[[Path], Any], list[str]]] = [
    ("write", lambda b: write_at(b / "file", 0, b"Z"), ["file", "."]),
    ("create", lambda b: open_close(b / "n", os.O_CREAT | os.O_WRONLY), ["."]),
    ("mkdir", lambda b: os.mkdir(b / "n"), [".", "dir"]),
    ("unlink", lambda b: os.unlink(b / "dir" / "inner"), ["dir", "."]),
    ("chmod", lambda b: os.chmod(b / "file", 0o600), ["file", "."]),
    ("link", lambda b: os.link(b / "file", b / "dir" / "h"), ["file", "dir", "."]),
    (
        "rename",
        lambda b: os.rename(b / "dir" / "inner", b / "emptydir" / "i"),
        ["dir", "emptydir", "."],
    ),
    ("truncate", lambda b: os.truncate(b / "file", 1), ["file", "."]),
    ("setxattr", lambda b: os.setxattr(b / "file", "user.t", b"1"), ["file", "."]),
    ("rmdir", lambda b: os.rmdir(b / "emptydir"), [".", "dir"]),
    ("symlink", lambda b: os.symlink("t", b / "dir" / "s"), ["dir", "."]),
]


@pytest.mark.parametrize(("name", "op", "watched"), TIME_CASES, ids=[c[0] for c in TIME_CASES])
def test_times_change_as_local(
    shared_mount: TidefsMount,
    tmp_path: Path,
    name: str,
    op: Callable[[Path], Any],
    watched: list[str],
) -> None:
    """Each call changes mtime and ctime of exactly the inodes a local file system changes."""
    mine, oracle = trees(shared_mount, tmp_path)
    changed = []
    for b in (mine, oracle):
        paths = [b / w for w in watched]
        before = times(paths)
        time.sleep(0.02)  # past the local file system's timestamp granularity
        op(b)
        after = times(paths)
        changed.append([(a[0] != z[0], a[1] != z[1]) for a, z in zip(before, after, strict=True)])
    assert changed[0] == changed[1]


def test_utimensat_now_and_omit(tidefs_mount: TidefsMount) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    utime_now, utime_omit = (1 << 30) - 1, (1 << 30) - 2

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    p = tidefs_mount.path / "f"
    p.write_bytes(b"x")
    os.utime(p, ns=(5 * 10**9 + 1, 7 * 10**9 + 3))
    ts = (Timespec * 2)(Timespec(0, utime_omit), Timespec(0, utime_now))
    assert libc.utimensat(-100, os.fsencode(p), ts, 0) == 0
    st = os.stat(p)
    assert st.st_atime_ns == 5 * 10**9 + 1
    assert abs(st.st_mtime_ns - time.time_ns()) < 5 * 10**9
    ts = (Timespec * 2)(Timespec(9, 9), Timespec(0, utime_omit))
    mtime = st.st_mtime_ns
    assert libc.utimensat(-100, os.fsencode(p), ts, 0) == 0
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (9 * 10**9 + 9, mtime)


# -- files held open, locks, large directories, statfs ------------------------------


def test_unlinked_open_file_stays_usable(tidefs_mount: TidefsMount) -> None:
    p = tidefs_mount.path / "tmp"
    fd = os.open(p, os.O_CREAT | os.O_RDWR)
    os.write(fd, b"before unlink")
    os.fsync(fd)
    os.unlink(p)
    assert not p.exists()
    assert os.fstat(fd).st_nlink == 0
    os.write(fd, b" and after")
    assert os.pread(fd, 100, 0) == b"before unlink and after"
    os.fsync(fd)
    assert os.pread(fd, 100, 0) == b"before unlink and after"
    os.close(fd)
    # The last close reclaims the orphan: the state ends up with none.
    from tidefs.replica.state import State

    deadline = time.monotonic() + 10
    while True:
        st = State.open(tidefs_mount.state_dir, read_only=True)
        try:
            orphans = st.orphans()
        finally:
            st.close()
        if not orphans or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert orphans == []


def test_flock_and_posix_locks_within_a_mount(tidefs_mount: TidefsMount) -> None:
    p = tidefs_mount.path / "lock"
    p.write_bytes(b"")
    fd1 = os.open(p, os.O_RDWR)
    fd2 = os.open(p, os.O_RDWR)
    try:
        fcntl.flock(fd1, fcntl.LOCK_EX)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd1, fcntl.LOCK_UN)
        fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd2, fcntl.LOCK_UN)
        fcntl.lockf(fd1, fcntl.LOCK_EX)
        probe = (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except OSError as e:\n    print(e.errno)\nelse:\n    print(0)\n"
        )
        held = subprocess.run([sys.executable, "-c", probe, str(p)], capture_output=True, text=True)
        assert int(held.stdout) in (errno.EAGAIN, errno.EACCES)
        fcntl.lockf(fd1, fcntl.LOCK_UN)
        free = subprocess.run([sys.executable, "-c", probe, str(p)], capture_output=True, text=True)
        assert int(free.stdout) == 0
    finally:
        os.close(fd1)
        os.close(fd2)


def test_large_directory_listing_is_stable_while_it_changes(tidefs_mount: TidefsMount) -> None:
    d = tidefs_mount.path / "big"
    d.mkdir()
    names = {f"entry-{i:05d}" for i in range(1500)}
    for name in names:
        (d / name).write_bytes(b"")
    assert set(os.listdir(d)) == names
    seen: list[str] = []
    with os.scandir(d) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i == 10:  # change the directory in the middle of the listing
                for j in range(100):
                    (d / f"late-{j}").write_bytes(b"")
                os.unlink(d / "entry-00000") if "entry-00000" not in seen else None
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    untouched = names - {"entry-00000"}
    assert untouched <= set(seen), "an entry that stayed was skipped"


def test_statfs(tidefs_mount: TidefsMount) -> None:
    s = os.statvfs(tidefs_mount.path)
    assert s.f_bavail > 0 and s.f_blocks >= s.f_bfree >= s.f_bavail
    assert s.f_namemax == 255
    assert s.f_files > 0
