"""The kernel keeps names and attributes for a long time, and every change still shows at once.

A mount replies with entry and attribute timeouts of a minute: a `stat` or
a path walk over files nobody changes stops at the kernel, not at the
mount (the proof is the mount's own count of FUSE requests, from its
Prometheus endpoint). What makes that safe is that no change waits for a
timeout: this mount's own changes reach the kernel through its replies and
the kernel's invalidation after each call, and changes made in another
region through the invalidation of what their fold changed, negative
entries ("no such name") included.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.mount import MountFactory, fuse_requests
from tests.harness.s3 import free_port
from tidefs.fs.mount import sync_mount

pytestmark = pytest.mark.fuse


def _wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_names_and_attributes_stay_cached_past_a_second(mount_factory: MountFactory) -> None:
    port = free_port()
    m = mount_factory(extra=["--metrics-port", str(port)])
    (m.path / "data").mkdir()
    for i in range(20):
        (m.path / "data" / f"f{i}").write_bytes(b"x" * i)

    def walk() -> None:
        for i in range(20):
            assert os.stat(m.path / "data" / f"f{i}").st_size == i
        assert not os.path.exists(m.path / "data" / "absent")  # a negative entry

    walk()
    before = fuse_requests(port, ("lookup", "getattr"))
    time.sleep(1.5)  # past the 1 s the kernel used to keep them
    walk()
    walk()
    assert fuse_requests(port, ("lookup", "getattr")) == before, "a stat of unchanged files asked"


def test_own_changes_show_at_once_through_long_caches(mount_factory: MountFactory) -> None:
    """Every kind of change this mount makes is visible to the next stat, without waiting."""
    m = mount_factory()
    d = m.path / "d"
    d.mkdir()
    f = d / "f"
    f.write_bytes(b"12345")
    st = os.stat(f)  # cache everything
    assert os.stat(d).st_nlink == 2 and not os.path.exists(d / "g")

    os.chmod(f, 0o600)
    assert os.stat(f).st_mode & 0o777 == 0o600
    os.chown(f, 1234, 5678)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (1234, 5678)
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(f).st_mtime_ns == 2_000_000_000
    os.link(f, d / "g")
    assert os.stat(f).st_nlink == 2 and os.stat(d / "g").st_ino == st.st_ino
    os.unlink(d / "g")
    assert os.stat(f).st_nlink == 1 and not os.path.exists(d / "g")
    ctime = os.stat(f).st_ctime_ns
    time.sleep(0.01)
    os.setxattr(f, "user.k", b"v")
    assert os.stat(f).st_ctime_ns > ctime
    with open(f, "ab") as fh:
        fh.write(b"678")
    assert os.stat(f).st_size == 8
    os.truncate(f, 2)
    assert os.stat(f).st_size == 2
    (d / "sub").mkdir()
    assert os.stat(d).st_nlink == 3
    os.rename(f, d / "sub" / "moved")
    assert not os.path.exists(f) and os.stat(d / "sub" / "moved").st_ino == st.st_ino
    os.rename(d / "sub", m.path / "top")
    assert os.stat(d).st_nlink == 2 and os.path.exists(m.path / "top" / "moved")
    os.unlink(m.path / "top" / "moved")
    os.rmdir(m.path / "top")
    assert not os.path.exists(m.path / "top")


def test_changes_made_elsewhere_show_through_long_caches(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    """With the default timeouts, b's cached names and attributes follow a's changes."""
    regions = [("a", (tmp_path / "sa").as_uri()), ("b", (tmp_path / "sb").as_uri())]
    a = mount_factory(regions=regions, region="a")
    b = mount_factory(volume=a.volume, journal_url=a.journal_url, region="b")
    (a.path / "d").mkdir()
    (a.path / "d" / "f").write_bytes(b"one")
    assert sync_mount(str(b.path)) == 0
    f = b.path / "d" / "f"
    ino = os.stat(f).st_ino  # b caches the name and its attributes
    assert os.stat(b.path / "d").st_nlink == 2
    assert not os.path.exists(b.path / "d" / "late")  # and a negative entry

    (a.path / "d" / "late").write_bytes(b"here")
    _wait_for(lambda: os.path.exists(b.path / "d" / "late"))
    os.link(a.path / "d" / "f", a.path / "d" / "g")
    _wait_for(lambda: os.stat(f).st_nlink == 2)
    os.utime(a.path / "d" / "f", ns=(5_000_000_000, 6_000_000_000))
    _wait_for(lambda: os.stat(f).st_mtime_ns == 6_000_000_000)
    os.chown(a.path / "d" / "f", 4321, 8765)
    _wait_for(lambda: os.stat(f).st_uid == 4321)
    (a.path / "d" / "sub").mkdir()
    _wait_for(lambda: os.stat(b.path / "d").st_nlink == 3)
    os.rename(a.path / "d" / "g", a.path / "d" / "sub" / "g")
    _wait_for(lambda: not os.path.exists(b.path / "d" / "g"))
    assert os.stat(b.path / "d" / "sub" / "g").st_ino == ino
    os.unlink(a.path / "d" / "f")
    _wait_for(lambda: not os.path.exists(f))
    assert os.stat(b.path / "d" / "sub" / "g").st_nlink == 1
