"""A mount on a machine shared with other users: who may reach what.

Metrics stay on loopback unless exposed on purpose, `--private` keeps a mount
to its owner, a mount never hides a directory's files by accident, `umount`
signals only the tidefs process that serves that very mount point, and the
files a mount keeps locally are the owner's alone. Other users are played by
`nobody` in child processes (the tests run as root).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.mount import MountFactory, TidefsMount, run_as
from tests.harness.s3 import free_port

pytestmark = pytest.mark.fuse


def as_nobody(fn: Callable[[], Any]) -> Any:
    """Run `fn()` as nobody in a child process: its value, or the errno it failed with."""

    def attempt() -> Any:
        try:
            return ("ok", fn())
        except OSError as exc:
            return ("err", exc.errno)

    return run_as(attempt)


def mount_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidefs.fs.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def cli_mount_args(m: TidefsMount, mountpoint: Path | None = None) -> list[str]:
    return [
        "mount", m.volume, str(mountpoint or m.path), "--journal", m.journal_url,
        "--region", m.region, "--state-dir", str(m.state_dir), "--cache-dir", str(m.cache_dir),
    ]  # fmt: skip


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


# -- 8: metrics on loopback unless exposed on purpose ---------------------------


def test_metrics_port_serves_loopback_only(mount_factory: MountFactory) -> None:
    # Every 127/8 address reaches this machine: a socket on 0.0.0.0 answers on
    # 127.0.0.2 as on any interface, one on 127.0.0.1 does not.
    port = free_port()
    mount_factory(extra=["--metrics-port", str(port)])
    assert reachable("127.0.0.1", port)
    assert not reachable("127.0.0.2", port), "--metrics-port listens beyond loopback"


def test_metrics_addr_exposes_the_address_asked_for(mount_factory: MountFactory) -> None:
    port = free_port()
    mount_factory(extra=["--metrics-addr", f"127.0.0.2:{port}"])
    assert reachable("127.0.0.2", port)
    assert not reachable("127.0.0.1", port)


@pytest.mark.parametrize("bad", ["9464", "host:", ":9464", "h:99999", "h:x"])
def test_a_bad_metrics_addr_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    proc = mount_cli(
        "mount", "v", str(tmp_path), "--journal", f"sqlite:///{tmp_path}/j.db",
        "--region", "a", "--metrics-addr", bad,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "HOST:PORT" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_metrics_addr_and_port_exclude_each_other(tmp_path: Path) -> None:
    proc = mount_cli(
        "mount", "v", str(tmp_path), "--journal", f"sqlite:///{tmp_path}/j.db",
        "--region", "a", "--metrics-addr", "127.0.0.1:9464", "--metrics-port", "9464",
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "exclude each other" in proc.stderr
    assert os.listdir(tmp_path) == []


# -- 9: --private ---------------------------------------------------------------


def test_private_mount_refuses_other_users(public_mount_factory: MountFactory) -> None:
    shared = public_mount_factory()
    (shared.path / "f").write_bytes(b"shared")
    os.chmod(shared.path, 0o755)
    # Root's mount serves every user by default (permission bits decide)...
    assert as_nobody(lambda: os.listdir(shared.path)) == ("ok", ["f"])
    private = public_mount_factory(extra=["--private"])
    (private.path / "f").write_bytes(b"mine")
    os.chmod(private.path, 0o755)
    # ...a private one refuses them before any permission bit is looked at.
    assert as_nobody(lambda: os.listdir(private.path)) == ("err", errno.EACCES)
    assert as_nobody(lambda: os.stat(private.path / "f").st_size) == ("err", errno.EACCES)
    assert (private.path / "f").read_bytes() == b"mine"


# -- 12: no mount over a directory's files ----------------------------------------


def test_mount_refuses_a_nonempty_directory(mount_factory: MountFactory) -> None:
    m = mount_factory(start=False)
    m.path.mkdir()
    (m.path / "precious").write_bytes(b"here before")
    before = sorted(os.listdir(m.root))
    proc = mount_cli(*cli_mount_args(m))
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not empty" in proc.stderr and "--nonempty" in proc.stderr
    assert not os.path.ismount(m.path)
    assert sorted(os.listdir(m.root)) == before  # no state, cache or log left behind
    # Asked for, it mounts over them (hidden while mounted, back afterwards).
    m.extra.append("--nonempty")
    m.start()
    assert os.listdir(m.path) == []
    m.stop()
    assert (m.path / "precious").read_bytes() == b"here before"


# -- 6: umount and sync believe only a record proven to serve the mount ----------


def record_file(mountpoint: Path) -> Path:
    """Where the mount at `mountpoint` keeps its record (named by the mount point's hash)."""
    from tidefs.fs import mount as fsmount

    return Path(fsmount._record_path(fsmount.canonical_mountpoint(str(mountpoint))))


def is_mounted(path: Path) -> bool:
    """From the mount table: a dead FUSE mount makes os.path.ismount say False."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def kill_mount(m: TidefsMount) -> None:
    """SIGKILL a mount's process: the kernel keeps its mount, dead (ENOTCONN)."""
    assert m.proc is not None
    m.proc.kill()
    m.proc.wait(30)
    m.proc = None


@pytest.fixture
def no_dead_mounts(tmp_path: Path) -> Iterator[None]:
    """Whatever a test leaves mounted under tmp_path is detached afterwards."""
    yield
    with open("/proc/self/mountinfo") as f:
        left = [line.split()[4] for line in f if line.split()[4].startswith(str(tmp_path))]
    for path in left:
        subprocess.run(["fusermount3", "-u", "-z", path], check=False)


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A process of root's that has nothing to do with tidefs: it must survive every test."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def squatted_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An $XDG_RUNTIME_DIR whose tidefs/ directory another user (nobody) made first."""
    base = Path(tempfile.mkdtemp(prefix="tidefs-run-"))
    base.chmod(0o1777)  # like /tmp: everyone may create entries
    private_before = set(Path(tempfile.gettempdir()).glob(f"tidefs-{os.geteuid()}-*"))
    assert as_nobody(lambda: os.mkdir(base / "tidefs", 0o755)) == ("ok", None)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    yield base / "tidefs"
    shutil.rmtree(base, ignore_errors=True)
    for made in set(Path(tempfile.gettempdir()).glob(f"tidefs-{os.geteuid()}-*")) - private_before:
        shutil.rmtree(made, ignore_errors=True)


def test_a_record_planted_by_another_user_is_ignored(
    mount_factory: MountFactory,
    squatted_runtime: Path,
    victim: subprocess.Popen[bytes],
    tmp_path: Path,
) -> None:
    import hashlib
    import json

    from tidefs.fs.mount import canonical_mountpoint, sync_mount, umount

    m = mount_factory()  # its record goes elsewhere: the squatted directory is not root's
    (m.path / "f").write_bytes(b"kept")
    mp = canonical_mountpoint(str(m.path))
    evil_journal = squatted_runtime / "evil.db"
    fake = {
        "pid": victim.pid, "mountpoint": mp, "volume": m.volume, "region": m.region,
        "journal_url": f"sqlite:///{evil_journal}", "state_dir": str(squatted_runtime),
    }  # fmt: skip
    name = hashlib.sha256(mp.encode()).hexdigest()[:24] + ".json"

    def plant() -> None:
        tmp = squatted_runtime / "planted.tmp"
        tmp.write_text(json.dumps(fake))
        os.replace(tmp, squatted_runtime / name)

    assert as_nobody(plant) == ("ok", None)
    # sync reads the mount's own journal, never the one the planted record names...
    assert sync_mount(str(m.path), timeout=30) == 0
    assert not evil_journal.exists()
    # ...and umount stops the mount, not the process the planted record names.
    assert umount(str(m.path)) == 0
    assert m.proc is not None and m.proc.wait(30) == 0
    assert victim.poll() is None, "umount signalled a process named by another user's record"
    assert not is_mounted(m.path)
    m.start()
    assert (m.path / "f").read_bytes() == b"kept"


@pytest.mark.usefixtures("no_dead_mounts")
def test_umount_of_a_killed_mount_detaches_it_and_signals_nobody(
    mount_factory: MountFactory, victim: subprocess.Popen[bytes]
) -> None:
    import json

    m = mount_factory()
    (m.path / "f").write_bytes(b"durable at close")
    path = record_file(m.path)
    record = json.loads(path.read_text())
    assert m.proc is not None and record["pid"] == m.proc.pid
    kill_mount(m)
    assert is_mounted(m.path)  # the kernel keeps the dead mount
    # The killed mount's PID now names another process (as when PIDs wrap around).
    record["pid"] = victim.pid
    path.write_text(json.dumps(record))
    proc = mount_cli("umount", str(m.path))
    assert proc.returncode == 0, proc.stderr
    assert "dead mount" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert victim.poll() is None, "umount signalled a process that does not serve the mount"
    assert not is_mounted(m.path)
    assert not path.exists()  # the stale record is gone too
    m.start()
    assert (m.path / "f").read_bytes() == b"durable at close"


@pytest.mark.usefixtures("no_dead_mounts")
def test_mount_after_a_killed_mount_detaches_it_and_says_so(mount_factory: MountFactory) -> None:
    from tidefs.fs.mount import umount

    m = mount_factory()
    (m.path / "f").write_bytes(b"still here")
    kill_mount(m)
    try:
        proc = mount_cli(*cli_mount_args(m))
        assert proc.returncode == 0, proc.stderr
        assert "detached the dead mount" in proc.stderr
        assert proc.stderr.strip().count("\n") == 0
        assert (m.path / "f").read_bytes() == b"still here"
    finally:
        if is_mounted(m.path):
            umount(str(m.path))
    assert not is_mounted(m.path)


def test_umount_of_something_not_mounted_says_so(tmp_path: Path) -> None:
    proc = mount_cli("umount", str(tmp_path))
    assert proc.returncode == 1
    assert "is not mounted" in proc.stderr


# -- 5: what a mount keeps locally is its owner's alone ----------------------------


def readable_by_nobody(paths: list[Path], needle: bytes) -> list[str]:
    """As nobody, `grep -ra needle` over `paths`: the files whose bytes were found."""

    def grep() -> list[str]:
        found = []
        for top in paths:
            files = [str(top)] if not top.is_dir() else []
            for d, _dirs, names in os.walk(top):
                files += [os.path.join(d, n) for n in names]
            for f in files:
                try:
                    with open(f, "rb") as fh:
                        if needle in fh.read():
                            found.append(f)
                except OSError:
                    pass
        return found

    outcome = as_nobody(grep)
    assert outcome[0] == "ok", outcome
    return list(outcome[1])


def test_local_files_are_owner_only_whatever_the_umask(public_mount_factory: MountFactory) -> None:
    old = os.umask(0)  # the mount inherits it: modes must not depend on it
    try:
        m = public_mount_factory()
        fd = os.open(m.path / "secret-name", os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"SECRET-0123456789" * 100)
        os.close(fd)  # durable at close: in the store and the log
        os.mkdir(m.path / "shared", 0o755)
        fd = os.open(m.path / "shared" / "open", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
    finally:
        os.umask(old)
    # Files made through the mount keep the modes asked for...
    assert os.stat(m.path / "shared").st_mode & 0o777 == 0o755
    assert os.stat(m.path / "shared" / "open").st_mode & 0o777 == 0o666
    journal = Path(m.journal_url.removeprefix("sqlite://"))
    store = m.root / "store-a"
    local = [store, m.state_dir, m.cache_dir]
    # ...while everything kept locally is the owner's alone.
    for top in local:
        assert top.stat().st_mode & 0o777 == 0o700, top
        for d, dirs, names in os.walk(top):
            for name in dirs:
                assert os.stat(os.path.join(d, name)).st_mode & 0o077 == 0, (d, name)
            if top == m.state_dir:
                continue  # RocksDB's own files: unreachable inside the 0700 directory
            for name in names:
                assert os.stat(os.path.join(d, name)).st_mode & 0o777 == 0o600, (d, name)
    journal_files = [p for p in (journal, Path(f"{journal}-wal"), Path(f"{journal}-shm"))]
    for p in journal_files:
        if p.exists():
            assert p.stat().st_mode & 0o777 == 0o600, p
    record = record_file(m.path)
    assert record.stat().st_mode & 0o777 == 0o600
    assert record.parent.stat().st_mode & 0o777 == 0o700
    # Another user finds neither the bytes nor the name.
    assert readable_by_nobody([*local, *journal_files], b"SECRET-0123456789") == []
    assert readable_by_nobody([*local, *journal_files], b"secret-name") == []
    assert as_nobody(lambda: os.listdir(store)) == ("err", errno.EACCES)


def test_mount_warns_about_files_other_users_can_read_and_strict_refuses(
    mount_factory: MountFactory,
) -> None:
    from tidefs.fs.mount import umount

    m = mount_factory(start=False)
    m.path.mkdir()
    m.state_dir.mkdir(mode=0o755)
    m.state_dir.chmod(0o755)  # as made by hand, or by an older tidefs
    journal = Path(m.journal_url.removeprefix("sqlite://"))
    journal.chmod(0o644)
    args = cli_mount_args(m)
    strict = mount_cli(*args, "--strict")
    assert strict.returncode == 1
    assert len(strict.stderr.strip().splitlines()) == 1, strict.stderr
    assert str(m.state_dir) in strict.stderr and "--strict" in strict.stderr
    assert not os.path.ismount(m.path)
    try:
        proc = mount_cli(*args)
        assert proc.returncode == 0, proc.stderr
        warnings = proc.stderr.strip().splitlines()
        assert str(m.state_dir) in warnings[0] and "0755" in warnings[0]
        assert f"chmod -R go-rwx {m.state_dir}" in warnings[0]
        # The log, and its -wal and -shm, which SQLite makes with the log's mode.
        assert len(warnings) == 4, proc.stderr
        for w, suffix in zip(warnings[1:], ("", "-wal", "-shm"), strict=True):
            assert f"journal.db{suffix} is a file" in w and "0644" in w, w
            assert "chmod go-rwx " in w
    finally:
        umount(str(m.path))
    assert not os.path.ismount(m.path)


def test_another_user_cannot_umount_roots_mount(public_mount_factory: MountFactory) -> None:
    from tidefs.fs.mount import umount

    m = public_mount_factory()
    os.chmod(m.path, 0o755)
    assert as_nobody(lambda: umount(str(m.path), timeout=10)) == ("ok", 1)
    assert m.running and os.path.ismount(m.path)
