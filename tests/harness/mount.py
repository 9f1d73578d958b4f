"""Real FUSE mounts for tests: format a fresh volume, mount it in a subprocess, always unmount.

The mount runs as `python -m tidefs.fs.mount ... --foreground --ready-fd N`, a
process of its own exactly like a user's mount, so tests exercise the kernel,
pyfuse3 and the daemon's shutdown path, and a crash of the file system fails a
test instead of the test run. `--ready-fd` makes start-up deterministic: the
mount writes "ready" once it serves, or its error line.

Teardown never leaves a mount behind: `TidefsMount.stop` asks the daemon to
flush and unmount (`tidefs.fs.mount.umount`), waits for it, and falls back to
`fusermount3 -u -z` and SIGKILL.

Test volumes use small chunks and blocks (1 MiB, 64 KiB) so that ordinary
test files cross slice, block and chunk boundaries.

Fixtures:
- `mount_factory` (function): `make(store_url=None, **options) -> TidefsMount`
  formats a fresh volume and mounts it; everything is torn down afterwards.
- `tidefs_mount` (function): one fresh mounted volume on a directory store.
- `shared_mount` (module, parametrized "file" and "s3"): one mounted volume
  for a whole module on each block store; tests work in their own
  subdirectories of it.
- `store_mount` (function): a fresh mounted volume on each store backend
  (`store_url`: a directory, then S3).
- `public_mount_factory` (function): `mount_factory` under a short path that
  other users can reach (for tests that switch users or bind unix sockets).
- `public_store_mount` (function): `store_mount` under such a path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pickle
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.s3 import use_fake_aws_env
from tidefs import telemetry
from tidefs.fs.mount import umount
from tidefs.fs.volume import format_volume
from tidefs.journal.commands import Region

TEST_CHUNK_SIZE = 1 << 20
TEST_BLOCK_SIZE = 64 << 10


def fuse_available() -> bool:
    """Whether this machine can make FUSE mounts at all."""
    return os.path.exists("/dev/fuse") and bool(
        subprocess.run(["which", "fusermount3"], capture_output=True).returncode == 0
    )


@dataclass
class TidefsMount:
    """One mount of one region of a volume, served by a subprocess."""

    root: Path
    volume: str
    journal_url: str
    region: str
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def path(self) -> Path:
        return self.root / f"mnt-{self.region}"

    @property
    def state_dir(self) -> Path:
        return self.root / f"state-{self.region}"

    @property
    def cache_dir(self) -> Path:
        return self.root / f"cache-{self.region}"

    @property
    def log_path(self) -> Path:
        return self.root / f"mount-{self.region}.log"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tidefs.fs.mount",
            self.volume,
            str(self.path),
            "--journal",
            self.journal_url,
            "--region",
            self.region,
            "--state-dir",
            str(self.state_dir),
            "--cache-dir",
            str(self.cache_dir),
            "--foreground",
            *self.extra,
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Mount and return once the file system serves; raise with the log on failure."""
        self.path.mkdir(parents=True, exist_ok=True)
        r, w = os.pipe()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command(), "--ready-fd", str(w)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(w,),
                start_new_session=True,
            )
        os.close(w)
        line = b""
        deadline = time.monotonic() + timeout
        try:
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                ready, _, _ = select.select([r], [], [], 0.2)
                if ready:
                    chunk = os.read(r, 4096)
                    if not chunk:
                        break
                    line += chunk
        finally:
            os.close(r)
        if line != b"ready\n" or not os.path.ismount(self.path):
            self.stop()
            raise RuntimeError(f"mount failed ({line!r}):\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        """Flush and unmount; never leave a mount or a process behind."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None and os.path.ismount(self.path):
            umount(str(self.path), timeout=timeout)
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)

    def remount(self) -> None:
        """Unmount (flushing everything) and mount again from the same state."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


MountFactory = Callable[..., TidefsMount]


def fuse_requests(port: int, ops: tuple[str, ...]) -> float:
    """FUSE requests of the kinds `ops` that the mount with metrics on `port` has answered.

    The mount's own count (its Prometheus endpoint) proves which calls the
    kernel answered from its caches without asking the mount.
    """
    name = telemetry.FUSE_DURATION.prometheus + "_count"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels.get("op") in ops
    )


@contextlib.contextmanager
def _factory(base: Path) -> Iterator[MountFactory]:
    made: list[TidefsMount] = []
    counter = iter(range(1_000_000))

    def make(
        store_url: str | None = None,
        *,
        regions: list[tuple[str, str]] | None = None,
        region: str = "a",
        chunk_size: int = TEST_CHUNK_SIZE,
        block_size: int = TEST_BLOCK_SIZE,
        extra: list[str] | None = None,
        start: bool = True,
        volume: str | None = None,
        journal_url: str | None = None,
        check_stores: bool = True,
    ) -> TidefsMount:
        """Format a fresh volume (unless `volume` names one) and mount `region` of it."""
        n = next(counter)
        root = base / f"vol{n}"
        root.mkdir(parents=True)
        if volume is None:
            volume = f"v{n}"
            journal_url = f"sqlite:///{root}/journal.db"
            if regions is None:
                regions = [(region, store_url or (root / "store-a").as_uri())]
            format_volume(
                journal_url,
                volume,
                [Region(name, url) for name, url in regions],
                regions[0][0],
                chunk_size=chunk_size,
                block_size=block_size,
                check_stores=check_stores,
            )
        assert journal_url is not None
        m = TidefsMount(
            root,
            volume,
            journal_url,
            region,
            ["--flush-interval", "1", "--compact-threshold", "8", "--compact-delay", "0.5"]
            + (extra or []),
        )
        made.append(m)
        if start:
            m.start()
        return m

    try:
        yield make
    finally:
        for m in reversed(made):
            m.stop()


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[MountFactory]:
    """Make fresh volumes and mounts (`make(store_url=None, **options)`); all unmounted after."""
    if not fuse_available():
        pytest.skip("no /dev/fuse or fusermount3")
    with _factory(tmp_path) as make:
        yield make


@pytest.fixture
def tidefs_mount(mount_factory: MountFactory) -> TidefsMount:
    """A fresh volume on a directory store, mounted for region a."""
    return mount_factory()


@pytest.fixture(scope="module", params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def shared_mount(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TidefsMount]:
    """One mounted volume for a whole test module, on each block store (a directory, then S3)."""
    if not fuse_available():
        pytest.skip("no /dev/fuse or fusermount3")
    with contextlib.ExitStack() as stack:
        store_url = None
        if request.param == "s3":
            server = request.getfixturevalue("s3_server")
            # The mount process inherits them.
            use_fake_aws_env(stack.enter_context(pytest.MonkeyPatch.context()))
            server.start()
            bucket = server.create_bucket()
            stack.callback(server.drop_bucket, bucket)
            store_url = server.store_url(bucket)
        make = stack.enter_context(_factory(tmp_path_factory.mktemp("shared")))
        yield make(store_url)


@pytest.fixture
def store_mount(mount_factory: MountFactory, store_url: str) -> TidefsMount:
    """A fresh volume mounted on each store backend (a directory, then S3)."""
    return mount_factory(store_url)


@pytest.fixture
def public_mount_factory() -> Iterator[MountFactory]:
    """Like `mount_factory`, under a short path that every user can traverse.

    A test's own directory is private to its user and deep: other users could
    not reach a mount inside it, and unix socket paths (108 bytes at most)
    would not fit.
    """
    if not fuse_available():
        pytest.skip("no /dev/fuse or fusermount3")
    base = Path(tempfile.mkdtemp(prefix="tidefs-"))
    try:
        base.chmod(0o755)
        with _factory(base) as make:
            yield make
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def public_store_mount(store_url: str, public_mount_factory: MountFactory) -> TidefsMount:
    """Like `store_mount`, under a short path that every user can traverse."""
    return public_mount_factory(store_url)


# -- the oracle: the same call on tidefs and on a local directory ---------------
#
# For every call tidefs must return the same value or fail with the same errno
# as the local file system, and leave the same tree behind. Values are reduced
# to what must agree across file systems (types, modes, sizes, link counts,
# contents), leaving out what legitimately differs (inode and device numbers,
# times).

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old: str | Path, new: str | Path, flags: int) -> None:
    """rename(2) with flags (RENAME_NOREPLACE, RENAME_EXCHANGE); `os` has no binding."""
    ret = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


def stat_view(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """The parts of a stat result that two file systems must agree on."""
    size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
    return (st.st_mode, st.st_nlink, size, st.st_uid, st.st_gid)


def normalize(value: Any) -> Any:
    if isinstance(value, os.stat_result):
        return stat_view(value)
    if isinstance(value, list):
        return sorted(value)
    return value


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """Run `fn`: ("ok", normalized value) or ("err", errno name)."""
    try:
        return ("ok", normalize(fn()))
    except OSError as exc:
        assert exc.errno is not None
        return ("err", errno.errorcode.get(exc.errno, str(exc.errno)))


NOBODY = 65534


def run_as(
    fn: Callable[[], Any], uid: int = NOBODY, gid: int = NOBODY, cwd: Path | None = None
) -> Any:
    """Run `fn()` in a child process as uid/gid (in `cwd`) and return its value, pickled back.

    Another user's view needs a process of its own: root cannot drop its
    identity and take it back.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if cwd is not None:
                os.chdir(cwd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.write(w, pickle.dumps(fn()))
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return pickle.loads(data)


def snapshot(base: Path) -> dict[str, Any]:
    """Describe a tree: every path's type, mode, size, link count and content."""
    out: dict[str, Any] = {}

    def walk(d: Path, rel: str) -> None:
        for name in sorted(os.listdir(d)):
            p = d / name
            r = f"{rel}{name}"
            st = os.lstat(p)
            view = stat_view(st)
            if stat.S_ISDIR(st.st_mode):
                out[r] = ("dir", view)
                walk(p, r + "/")
            elif stat.S_ISLNK(st.st_mode):
                out[r] = ("link", view, os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[r] = ("file", view, p.read_bytes())
            else:
                out[r] = ("special", view)

    walk(base, "")
    return out
