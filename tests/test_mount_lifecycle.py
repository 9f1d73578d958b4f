"""Mount lifecycle: daemon start-up, clear failures, clean shutdown, and two regions at once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.mount import MountFactory, TidefsMount
from tidefs.fs.mount import umount

pytestmark = pytest.mark.fuse


def mount_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidefs.fs.mount", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_daemon_mounts_and_umount_flushes(mount_factory: MountFactory) -> None:
    m = mount_factory(start=False)
    m.path.mkdir()
    args = [m.volume, str(m.path), "--journal", m.journal_url, "--region", m.region]
    args += ["--state-dir", str(m.state_dir), "--cache-dir", str(m.cache_dir)]
    try:
        proc = mount_cli(*args)
        # The parent returns only once the daemon serves: usable on the next line.
        assert proc.returncode == 0, proc.stderr
        assert os.path.ismount(m.path)
        (m.path / "f").write_bytes(b"through the daemon")
        assert proc.stderr == ""
        # A second mount of the same state directory is refused, with one line.
        other = m.root / "other"
        other.mkdir()
        again = mount_cli(m.volume, str(other), *args[2:])
        assert again.returncode == 1
        assert again.stderr.strip().count("\n") == 0
        assert "in use by another tidefs mount" in again.stderr
        assert not os.path.ismount(other)
    finally:
        assert umount(str(m.path)) == 0
    assert not os.path.ismount(m.path)
    m.start()
    assert (m.path / "f").read_bytes() == b"through the daemon"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("volume", "does not exist"),
        ("region", "is not a region of volume"),
        ("mountpoint", "does not exist or is not a directory"),
        ("journal", "journal"),
        ("store", "is not usable"),
    ],
)
def test_bad_configuration_fails_fast(
    mount_factory: MountFactory, change: str, message: str
) -> None:
    dead = "s3://bucket/p?endpoint=http://127.0.0.1:9&region=us-east-1"
    if change == "store":
        m = mount_factory(dead, start=False, check_stores=False)
    else:
        m = mount_factory(start=False)
    m.path.mkdir()
    volume, mountpoint, journal, region = m.volume, str(m.path), m.journal_url, m.region
    if change == "volume":
        volume = "no-such-volume"
    elif change == "region":
        region = "mars"
    elif change == "mountpoint":
        mountpoint = str(m.root / "missing")
    elif change == "journal":
        journal = "bogus://nowhere"
    started = time.monotonic()
    proc = mount_cli(
        volume, mountpoint, "--journal", journal, "--region", region,
        "--state-dir", str(m.state_dir), "--cache-dir", str(m.cache_dir),
    )  # fmt: skip
    assert proc.returncode == 1
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert time.monotonic() - started < 30
    assert not os.path.ismount(m.path)


def test_sigint_in_foreground_flushes_and_unmounts(tidefs_mount: TidefsMount) -> None:
    p = tidefs_mount.path / "pending"
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"still buffered")
    assert tidefs_mount.proc is not None
    tidefs_mount.proc.send_signal(signal.SIGINT)
    assert tidefs_mount.proc.wait(30) == 0
    with contextlib.suppress(OSError):
        os.close(fd)
    assert not os.path.ismount(tidefs_mount.path)
    tidefs_mount.start()
    assert p.read_bytes() == b"still buffered"


def wait_for(predicate: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def read(p: Path) -> bytes | None:
    try:
        return p.read_bytes()
    except OSError:
        return None


def test_two_regions_see_each_others_changes(mount_factory: MountFactory, tmp_path: Path) -> None:
    regions = [("a", (tmp_path / "sa").as_uri()), ("b", (tmp_path / "sb").as_uri())]
    a = mount_factory(regions=regions, region="a")
    b = mount_factory(volume=a.volume, journal_url=a.journal_url, region="b")
    (a.path / "doc").write_bytes(b"version 1")
    wait_for(lambda: read(b.path / "doc") == b"version 1")
    # b now holds the file in its page cache (keep_cache): a change in a must reach it.
    fd = os.open(b.path / "doc", os.O_RDONLY)
    assert os.read(fd, 100) == b"version 1"
    os.close(fd)
    (a.path / "doc").write_bytes(b"version 2")
    wait_for(lambda: read(b.path / "doc") == b"version 2")
    # names: a rename and an unlink in b are seen in a
    os.rename(b.path / "doc", b.path / "renamed")
    wait_for(lambda: not (a.path / "doc").exists() and (a.path / "renamed").exists())
    (b.path / "dir").mkdir()
    (b.path / "dir" / "x").write_bytes(b"x")
    wait_for(lambda: sorted(os.listdir(a.path)) == ["dir", "renamed"])
    os.unlink(a.path / "dir" / "x")
    wait_for(lambda: os.listdir(b.path / "dir") == [])


def test_mirror_replicates_and_exports_metrics(mount_factory: MountFactory, tmp_path: Path) -> None:
    """A region's mount copies blocks it lacks in the background, and says so on /metrics."""
    from tests.harness.s3 import free_port

    regions = [("a", (tmp_path / "sa").as_uri()), ("b", (tmp_path / "sb").as_uri())]
    a = mount_factory(regions=regions, region="a")
    data = os.urandom(300_000)
    (a.path / "f").write_bytes(data)
    port = free_port()
    b = mount_factory(
        volume=a.volume,
        journal_url=a.journal_url,
        region="b",
        extra=["--metrics-port", str(port)],
    )

    def copied() -> bool:
        return sum(1 for q in (tmp_path / "sb").rglob("*") if q.is_file()) >= 5

    wait_for(copied)  # 300 kB in 64 KiB blocks: five blocks reach region b's store
    assert read(b.path / "f") == data
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    from tidefs import telemetry

    assert telemetry.FUSE_DURATION.prometheus + "_count" in text
    assert telemetry.FALLBACK_READS.prometheus in text


def test_max_staleness_mount_serves(mount_factory: MountFactory) -> None:
    m = mount_factory(extra=["--max-staleness", "0.5"])
    (m.path / "x").write_bytes(b"fresh")
    assert read(m.path / "x") == b"fresh"


def test_sync_is_a_barrier_across_regions(mount_factory: MountFactory, tmp_path: Path) -> None:
    from tidefs.fs.mount import mount_record, sync_mount

    regions = [("a", (tmp_path / "sa").as_uri()), ("b", (tmp_path / "sb").as_uri())]
    a = mount_factory(regions=regions, region="a")
    b = mount_factory(volume=a.volume, journal_url=a.journal_url, region="b")
    record = mount_record(str(b.path))
    assert record is not None and record["region"] == "b"
    for i in range(20):
        (a.path / f"f{i}").write_bytes(b"%d" % i)
        assert sync_mount(str(b.path)) == 0
        # after the barrier, b has folded the create and the commit
        assert (b.path / f"f{i}").read_bytes() == b"%d" % i
    assert sync_mount(str(tmp_path)) == 1


def test_remote_changes_invalidate_long_kernel_caches(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    """With 60 s kernel caches, another region's changes still show within seconds."""
    from tidefs.fs.mount import sync_mount

    regions = [("a", (tmp_path / "sa").as_uri()), ("b", (tmp_path / "sb").as_uri())]
    a = mount_factory(regions=regions, region="a")
    b = mount_factory(
        volume=a.volume, journal_url=a.journal_url, region="b", extra=["--attr-timeout", "60"]
    )
    assert read(b.path / "late") is None  # b's kernel now caches the name as absent
    (a.path / "doc").write_bytes(b"version 1")
    assert sync_mount(str(b.path)) == 0
    wait_for(lambda: read(b.path / "doc") == b"version 1", timeout=5)
    (a.path / "late").write_bytes(b"here")
    # The barrier bounds the fold; the kernel's 60 s negative entry must then
    # go through invalidation (a loaded machine gets more than 5 s for that).
    assert sync_mount(str(b.path)) == 0
    wait_for(lambda: read(b.path / "late") == b"here", timeout=15)
    (a.path / "doc").write_bytes(b"version 2")  # same size: only data and mtime change
    wait_for(lambda: read(b.path / "doc") == b"version 2", timeout=5)
    os.chmod(a.path / "doc", 0o600)
    wait_for(lambda: os.stat(b.path / "doc").st_mode & 0o777 == 0o600, timeout=5)
    os.unlink(a.path / "late")
    wait_for(lambda: not os.path.exists(b.path / "late"), timeout=5)
