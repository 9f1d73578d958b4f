"""Where a mount keeps its state and cache, and what a failed mount or format leaves behind.

The default directories are keyed by the volume's identity (its CreateVolume
record's request id), not by its name alone: two volumes called `data` in two
journals must never share a state. A mount or format that fails removes the
directories (and the journal file) it created, and says why in one line.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from tests.harness.cli import tidefs_cli as run
from tests.harness.kafka import KafkaBroker
from tests.harness.mount import fuse_available
from tidefs.fs import volume
from tidefs.fs.mount import MountError, default_cache_dir, default_dirs, default_state_dir
from tidefs.journal import codec
from tidefs.journal.commands import Envelope, Mkdir, Region
from tidefs.journal.log import open_log
from tidefs.replica.replica import fold_range
from tidefs.replica.state import State

pytestmark = pytest.mark.fuse


@pytest.fixture
def xdg(tmp_path: Path) -> dict[str, str]:
    """Default directories under the test's own tree."""
    if not fuse_available():
        pytest.skip("no /dev/fuse or fusermount3")
    return {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache")}


def format_volume(journal: str, store: Path, volume: str = "data") -> None:
    proc = run("format", volume, "--journal", journal, "--region", f"a={store.as_uri()}")
    assert proc.returncode == 0, proc.stderr


class Mounted:
    """A daemonized CLI mount, unmounted on exit."""

    def __init__(self, mnt: Path, *args: str, env: dict[str, str]) -> None:
        self.mnt = mnt
        mnt.mkdir(exist_ok=True)
        proc = run("mount", "data", str(mnt), *args, "--region", "a", env=env)
        assert proc.returncode == 0, proc.stderr

    def __enter__(self) -> Path:
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        assert run("umount", str(self.mnt)).returncode == 0
        assert not os.path.ismount(self.mnt)


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


# -- item: default directories keyed by the volume's identity ------------------------


def test_two_volumes_of_one_name_get_their_own_default_dirs(
    tmp_path: Path, xdg: dict[str, str]
) -> None:
    one, two = f"sqlite:///{tmp_path}/one.db", f"sqlite:///{tmp_path}/two.db"
    format_volume(one, tmp_path / "store-one")
    format_volume(two, tmp_path / "store-two")
    with Mounted(tmp_path / "m1", "--journal", one, env=xdg) as m:
        (m / "only-in-one").write_text("1")
    with Mounted(tmp_path / "m2", "--journal", two, env=xdg) as m:
        # The other volume's state must not show through.
        assert os.listdir(m) == []
        (m / "only-in-two").write_text("2")
    with Mounted(tmp_path / "m1", "--journal", one, env=xdg) as m:
        assert os.listdir(m) == ["only-in-one"]
    data = Path(xdg["XDG_DATA_HOME"]) / "tidefs"
    cache = Path(xdg["XDG_CACHE_HOME"]) / "tidefs"
    assert len([d for d in os.listdir(data) if d.startswith("data@")]) == 2, os.listdir(data)
    assert len([d for d in os.listdir(cache) if d.startswith("data@")]) == 2, os.listdir(cache)
    assert not (data / "data").exists()


def test_an_old_default_dir_stays_in_use_only_for_its_own_volume(
    tmp_path: Path, xdg: dict[str, str]
) -> None:
    """A state in the name-only directory of older versions is kept if it is this volume's."""
    one, two = f"sqlite:///{tmp_path}/one.db", f"sqlite:///{tmp_path}/two.db"
    format_volume(one, tmp_path / "store-one")
    format_volume(two, tmp_path / "store-two")
    os.environ.update(xdg)
    try:
        legacy = Path(default_state_dir("data", "a"))
    finally:
        for var in xdg:
            del os.environ[var]
    assert legacy == Path(xdg["XDG_DATA_HOME"]) / "tidefs" / "data" / "a"
    # As an older version made it: the state in the name-only path.
    with Mounted(tmp_path / "m1", "--journal", one, "--state-dir", str(legacy), env=xdg) as m:
        (m / "kept").write_text("1")
    with Mounted(tmp_path / "m1", "--journal", one, env=xdg) as m:
        assert (legacy / "mount.pid").exists()  # the old directory serves this volume
        assert os.listdir(m) == ["kept"]
    before = tree(legacy)
    # The other volume of that name does not take it over.
    with Mounted(tmp_path / "m2", "--journal", two, env=xdg) as m:
        assert not (legacy / "mount.pid").exists()
        assert os.listdir(m) == []
    assert tree(legacy) == before  # looked at, not written
    assert len(os.listdir(legacy.parent.parent)) == 2  # data/ and data@<id of two>/


# -- item: failures leave nothing behind, in one line ----------------------------------


@pytest.mark.parametrize("foreground", [False, True])
def test_a_state_dir_that_is_a_file_is_one_line(
    tmp_path: Path, xdg: dict[str, str], foreground: bool
) -> None:
    journal = f"sqlite:///{tmp_path}/log.db"
    format_volume(journal, tmp_path / "store")
    (tmp_path / "mnt").mkdir()
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    for state_dir in (str(a_file), str(a_file / "below")):
        proc = run("mount", "data", str(tmp_path / "mnt"), "--journal", journal, "--region", "a",
                   "--state-dir", state_dir, *(["-f"] if foreground else []), env=xdg)  # fmt: skip
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "is not a directory" in proc.stderr
        assert a_file.read_text() == "x"
    assert not os.path.ismount(tmp_path / "mnt")
    assert not Path(xdg["XDG_CACHE_HOME"]).exists()


def test_a_failed_mount_removes_what_it_created_and_nothing_else(
    tmp_path: Path, xdg: dict[str, str]
) -> None:
    journal = f"sqlite:///{tmp_path}/log.db"
    format_volume(journal, tmp_path / "store")
    (tmp_path / "mnt").mkdir()
    listing = sorted(os.listdir(tmp_path))

    def fail(*args: str) -> None:
        # Region "mars" is found missing after the state was created and folded.
        proc = run("mount", "data", str(tmp_path / "mnt"), "--journal", journal,
                   "--region", "mars", *args, env=xdg)  # fmt: skip
        assert proc.returncode == 1
        assert "is not a region of volume" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

    # New directories, with new parents: all gone again.
    fail("--state-dir", str(tmp_path / "new" / "state"), "--cache-dir", str(tmp_path / "c" / "d"))
    assert sorted(os.listdir(tmp_path)) == listing
    # The default directories: gone, up to what existed.
    fail()
    assert not Path(xdg["XDG_DATA_HOME"]).exists()
    assert not Path(xdg["XDG_CACHE_HOME"]).exists()
    # Directories that existed stay; an empty one is left empty, a full one untouched.
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    fail("--state-dir", str(tmp_path / "empty"), "--cache-dir", str(tmp_path / "full"))
    assert os.listdir(tmp_path / "empty") == []
    assert os.listdir(tmp_path / "full") == ["keep"]


def test_a_mount_never_creates_a_journal(tmp_path: Path, xdg: dict[str, str]) -> None:
    (tmp_path / "mnt").mkdir()
    before = sorted(os.listdir(tmp_path))
    for volume_exists in (False, True):
        journal = f"sqlite:///{tmp_path}/log.db"
        if volume_exists:
            format_volume(journal, tmp_path / "store", volume="other")
            before = sorted(os.listdir(tmp_path))
        proc = run("mount", "data", str(tmp_path / "mnt"), "--journal", journal,
                   "--region", "a", "--state-dir", str(tmp_path / "state"), env=xdg)  # fmt: skip
        assert proc.returncode == 1
        assert f"volume 'data' does not exist in {journal}" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert sorted(os.listdir(tmp_path)) == before
    # The journal holding another volume did not gain one for `data`.
    proc = run("log", "data", "--journal", f"sqlite:///{tmp_path}/log.db")
    assert proc.stdout == ""


def test_a_failed_format_removes_the_store_dirs_it_created(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    listing = sorted(os.listdir(tmp_path))
    cases = [
        # The journal's directory is missing: both stores were made first.
        (f"sqlite:///{tmp_path}/nodir/log.db", ["a=" + (tmp_path / "s1" / "x" / "y").as_uri()]),
        # The second store is not usable.
        (
            f"sqlite:///{tmp_path}/log.db",
            ["a=" + (tmp_path / "s2").as_uri(), "b=" + (existing / "file" / "z").as_uri()],
        ),
    ]
    (existing / "file").write_text("a file where a directory should be")
    for journal, regions in cases:
        args = [arg for r in regions for arg in ("--region", r)]
        proc = run("format", "data", "--journal", journal, *args)
        assert proc.returncode == 1, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert sorted(os.listdir(tmp_path)) == listing, proc.stderr
    assert os.listdir(existing) == ["file"]
    # A volume that exists: its stores stay, of course.
    journal = f"sqlite:///{tmp_path}/log.db"
    format_volume(journal, tmp_path / "s3")
    proc = run(
        "format", "data", "--journal", journal, "--region", f"a={(tmp_path / 's3').as_uri()}"
    )
    assert proc.returncode == 1 and "already exists" in proc.stderr
    assert (tmp_path / "s3").is_dir()


@pytest.mark.kafka
def test_a_trimmed_log_keeps_its_default_dir(
    kafka_broker: KafkaBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once record 0 is deleted, the default directory is found by the state it holds."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    name = f"trim-{uuid.uuid4().hex[:8]}"
    # A state of another volume of that name, in a directory the scan will look at.
    other = f"sqlite:///{tmp_path}/other.db"
    volume.format_volume(other, name, [Region("a", (tmp_path / "s0").as_uri())], "a")
    os.makedirs(default_state_dir(name, "a", "0" * 16))
    with open_log(other, name) as lg, State.open(default_state_dir(name, "a", "0" * 16)) as st:
        fold_range(lg, st)

    volume.format_volume(kafka_broker.url, name, [Region("a", (tmp_path / "s").as_uri())], "a")
    with open_log(kafka_broker.url, name) as lg:
        for i in range(4):
            cmd = Mkdir(parent=1, name=f"d{i}".encode(), mode=0o40755, uid=0, gid=0)
            lg.append(codec.encode(Envelope(command=cmd, origin="a", timestamp_ns=i + 1)))
        state_dir, cache_dir = default_dirs(lg, name, "a")
        identity = volume.volume_identity(lg)
        assert identity is not None
        assert state_dir == default_state_dir(name, "a", identity)
        assert cache_dir == default_cache_dir(name, "a", identity)
        os.makedirs(state_dir)
        with State.open(state_dir) as st:
            fold_range(lg, st)
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    futures = admin.delete_records([TopicPartition(f"tidefs.{name}.log", 0, 3)])
    for future in futures.values():
        future.result(timeout=30)
    with open_log(kafka_broker.url, name) as lg:
        assert lg.start() == 3 and volume.volume_identity(lg) is None
        assert default_dirs(lg, name, "a") == (state_dir, cache_dir)
        with pytest.raises(MountError, match="give --state-dir and --cache-dir"):
            default_dirs(lg, name, "b")


def test_replicate_keys_its_default_state_by_the_volume(tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    journal = f"sqlite:///{tmp_path}/log.db"
    format_volume(journal, tmp_path / "store")
    proc = run("log", "data", "--journal", journal, "--json", "--limit", "1")
    identity = json.loads(proc.stdout)["request_id"][:16]
    proc = run("replicate", "data", "--journal", journal, "--region", "a", "--once",
               "--timeout", "30", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path / "data" / "tidefs") == [f"data@{identity}"]
    assert (tmp_path / "data" / "tidefs" / f"data@{identity}" / "a.replicate").is_dir()
    proc = run("replicate", "nosuch", "--journal", journal, "--region", "a", "--once", env=env)
    assert proc.returncode == 1
    assert "volume 'nosuch' does not exist" in proc.stderr
