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

from tests.harness.mount import MountFactory, TidefsMount, fuse_available
from tests.harness.s3 import free_port

pytestmark = pytest.mark.fuse

NOBODY = 65534


def as_nobody(fn: Callable[[], Any]) -> Any:
    """Run `fn()` as nobody in a child process: its value, or the errno it failed with."""
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                result: Any = ("ok", fn())
            except OSError as exc:
                result = ("err", exc.errno)
            os.write(w, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return pickle.loads(data)


@pytest.fixture
def public_factory() -> Iterator[MountFactory]:
    """Mounts under a directory every user may traverse (a test's tmp_path is root's alone)."""
    from tests.harness.mount import _factory

    if not fuse_available():
        pytest.skip("no /dev/fuse or fusermount3")
    base = Path(tempfile.mkdtemp(prefix="tidefs-sec-"))
    try:
        base.chmod(0o755)
        with _factory(base) as make:
            yield make
    finally:
        shutil.rmtree(base, ignore_errors=True)


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


def test_private_mount_refuses_other_users(public_factory: MountFactory) -> None:
    shared = public_factory()
    (shared.path / "f").write_bytes(b"shared")
    os.chmod(shared.path, 0o755)
    # Root's mount serves every user by default (permission bits decide)...
    assert as_nobody(lambda: os.listdir(shared.path)) == ("ok", ["f"])
    private = public_factory(extra=["--private"])
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
