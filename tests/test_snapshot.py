"""Snapshots: made from private states, verified on download, and as good as a full replay.

Also home to `OpsVolume`, the small volume builder that the operations tests
(restore, verify, fsck, gc) share: commands go through real Replicas on a
real log, and file data is sealed into real block stores under `block_key`,
exactly as a mount writes it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from tests.harness.kafka import KafkaBroker
from tests.harness.mount import MountFactory
from tidefs.journal.commands import (
    ROOT_INODE,
    AddRegion,
    Command,
    CommitSlice,
    CreateVolume,
    Mkdir,
    Mknod,
    Outcome,
    Region,
    SetAttr,
    SliceRef,
    Unlink,
)
from tidefs.journal.kafka import LogTrimmed
from tidefs.journal.log import Log, open_log
from tidefs.replica.blocks import block_key, new_slice_id
from tidefs.replica.fetch import blocks_needed
from tidefs.replica.replica import Replica, fold_range
from tidefs.replica.snapshot import (
    PART_SIZE,
    Snapshot,
    copy_state,
    create_snapshot,
    list_incomplete,
    list_snapshots,
    log_trim_point,
    manifest_key,
    part_key,
    prune_snapshots,
    rebuild_state,
    restore_newest_snapshot,
)
from tidefs.replica.state import State
from tidefs.replica.status import StatusPublisher, read_status
from tidefs.replica.store import BlockStore, open_store

BS = 64 << 10
"""Block size of the test volumes: small, so that a few hundred KiB make many blocks."""

CHUNK = 256 << 10
"""Chunk size of the test volumes: small, so that files span several chunks."""

TIDEFS = [sys.executable, "-m", "tidefs.fs.cli"]


def data(size: int, seed: int) -> bytes:
    """Return `size` bytes unique to (size, seed), so that a misplaced block is visible."""
    unit = seed.to_bytes(8, "big") + size.to_bytes(8, "big") + bytes(range(240))
    return (unit * (size // len(unit) + 1))[:size]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `tidefs` CLI in a subprocess."""
    proc = subprocess.run(
        [*TIDEFS, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tidefs {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def timed_run(*args: str) -> float:
    """Run the CLI to completion; return how long it took (to place the kills of a SIGKILL test)."""
    start = time.monotonic()
    run_cli(*args)
    return time.monotonic() - start


def kill_during(
    args: list[str], delay: float, when: Callable[[], bool] | None = None
) -> int | None:
    """Start the CLI with `args` and SIGKILL it after `delay` s, or as soon as `when()` holds.

    Returns its exit code if it finished first, None when it was killed.
    """
    proc = subprocess.Popen(
        [*TIDEFS, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + delay
    while proc.poll() is None:
        if time.monotonic() >= deadline or (when is not None and when()):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
        time.sleep(0.001)
    return proc.returncode


@dataclass
class OpsVolume:
    """A volume on a real log and real stores, written through non-threaded Replicas."""

    name: str
    journal_url: str
    tmp: Path
    urls: dict[str, str]
    stores: dict[str, BlockStore] = field(default_factory=dict)
    replicas: dict[str, Replica] = field(default_factory=dict)
    logs: list[Log] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        journal_url: str,
        name: str,
        tmp: Path,
        urls: dict[str, str],
        *,
        retention_s: int = 7 * 86400,
        timestamp_ns: int | None = None,
    ) -> OpsVolume:
        vol = cls(name, journal_url, tmp, dict(urls))
        for region, url in urls.items():
            vol.stores[region] = open_store(url, timeout=5.0)
        regions = tuple(Region(n, u) for n, u in urls.items())
        create = CreateVolume(
            name=name,
            regions=regions,
            primary=next(iter(urls)),
            chunk_size=CHUNK,
            block_size=BS,
            retention_s=retention_s,
        )
        vol.submit(create, timestamp_ns=timestamp_ns)
        return vol

    def open_log(self) -> Log:
        lg = open_log(self.journal_url, self.name)
        self.logs.append(lg)
        return lg

    def state_dir(self, region: str) -> Path:
        return self.tmp / f"state-{self.name}-{region}"

    def replica(self, region: str = "a") -> Replica:
        """The region's Replica; with no follower thread, `submit` folds on the caller's thread."""
        if region not in self.replicas:
            self.replicas[region] = Replica(
                self.open_log(), State.open(self.state_dir(region)), region
            )
        return self.replicas[region]

    def state(self, region: str = "a") -> State:
        return self.replica(region).state

    def sync(self, region: str = "a") -> int:
        """Fold `region` to the head; return its applied offset."""
        r = self.replica(region)
        return fold_range(r.log, r.state)

    def submit(
        self,
        command: Command,
        region: str = "a",
        *,
        timestamp_ns: int | None = None,
        ok: bool = True,
    ) -> Outcome:
        out = self.replica(region).submit(command, timestamp_ns=timestamp_ns)
        if ok:
            assert out.ok, (command, out)
        return out

    def upload(self, region: str, payload: bytes, offset: int = 0) -> SliceRef:
        """Seal `payload` into `region`'s store as a new slice's blocks, as a mount's writer does."""
        sid = new_slice_id()
        for i in range(0, len(payload), BS):
            self.stores[region].put_block(block_key(sid, i // BS), payload[i : i + BS])
        return SliceRef(sid, offset, len(payload), BS, region)

    def write(
        self,
        ino: int,
        pos: int,
        payload: bytes,
        region: str = "a",
        *,
        timestamp_ns: int | None = None,
    ) -> list[SliceRef]:
        """Write `payload` at file offset `pos`: one slice per chunk it touches."""
        refs = []
        while payload:
            chunk, within = divmod(pos, CHUNK)
            n = min(len(payload), CHUNK - within)
            ref = self.upload(region, payload[:n], within)
            self.submit(CommitSlice(ino, chunk, ref), region, timestamp_ns=timestamp_ns)
            refs.append(ref)
            payload, pos = payload[n:], pos + n
        return refs

    def mkfile(
        self, parent: int, name: bytes, payload: bytes = b"", region: str = "a", mode: int = 0o644
    ) -> int:
        ino = self.submit(Mknod(parent, name, 0o100000 | mode, 1000, 1000), region).inode
        if payload:
            self.write(ino, 0, payload, region)
        return ino

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755, region: str = "a") -> int:
        return self.submit(Mkdir(parent, name, mode, 1000, 1000), region).inode

    def close(self) -> None:
        for r in self.replicas.values():
            r.stop()
            r.state.close()
        for lg in self.logs:
            lg.close()
        for store in self.stores.values():
            store.close()


def read_file(state: State, ino: int, stores: dict[str, BlockStore]) -> bytes:
    """Read a file's bytes from its slices' blocks (later slices overlay earlier ones)."""
    attr = state.getattr(ino)
    assert attr is not None
    out = bytearray(attr.size)
    for chunk in state.chunks(ino):
        for s in state.slices(ino, chunk):
            payload = b"".join(
                stores[s.home].get_block(block_key(s.slice_id, i)) for i in range(blocks_needed(s))
            )[: s.length]
            start = chunk * CHUNK + s.offset
            out[start : start + len(payload)] = payload[: max(0, attr.size - start)]
    return bytes(out)


@pytest.fixture
def ops_volume(
    journal_url: str, journal_volume: str, tmp_path: Path
) -> Iterator[Callable[..., OpsVolume]]:
    """Make OpsVolumes on the test's journal (both backends); closed at teardown."""
    made: list[OpsVolume] = []

    def make(urls: dict[str, str] | None = None, **kw: object) -> OpsVolume:
        urls = urls or {"a": (tmp_path / "store-a").as_uri(), "b": (tmp_path / "store-b").as_uri()}
        vol = OpsVolume.create(journal_url, f"{journal_volume}{len(made)}", tmp_path, urls, **kw)  # type: ignore[arg-type]
        made.append(vol)
        return vol

    try:
        yield make
    finally:
        for vol in made:
            vol.close()


def churn(vol: OpsVolume, rounds: int, seed: int) -> None:
    """Append a history with creates, writes, overwrites, truncates and unlinks."""
    rng = random.Random(seed)
    d = vol.mkdir(ROOT_INODE, b"d%d" % seed)
    files: list[int] = []
    for i in range(rounds):
        op = rng.random()
        if op < 0.3 or not files:
            files.append(vol.mkfile(d, b"f%d" % i, data(rng.randrange(1, 3 * BS), i)))
        elif op < 0.6:
            vol.write(rng.choice(files), rng.randrange(0, 2 * CHUNK), data(rng.randrange(1, BS), i))
        elif op < 0.8:
            vol.submit(SetAttr(rng.choice(files), size=rng.randrange(0, CHUNK)))
        else:
            ino = files.pop(rng.randrange(len(files)))
            for _c, name, child in vol.state().readdir(d):
                if child == ino:
                    vol.submit(Unlink(d, name))
                    break


# -- tests -------------------------------------------------------------------------


def test_bootstrap_from_snapshot_equals_full_replay(
    ops_volume: Callable[..., OpsVolume], tmp_path: Path
) -> None:
    """A region started from a snapshot and the rest of the log agrees with the others."""
    vol = ops_volume()
    churn(vol, 25, seed=1)
    lg = vol.open_log()
    snap, new = create_snapshot(lg, vol.stores, volume=vol.name, region="a", work_dir=tmp_path)
    assert new and snap.offset == lg.head() - 1
    again, new_again = create_snapshot(
        lg, vol.stores, volume=vol.name, region="a", work_dir=tmp_path
    )
    assert again.id == snap.id and not new_again  # the same state is stored once
    churn(vol, 20, seed=2)
    c_url = (tmp_path / "store-c").as_uri()
    vol.submit(AddRegion(Region("c", c_url)))
    churn(vol, 5, seed=3)
    head = vol.sync("a")
    vol.sync("b")

    # Region c starts from a's snapshot (its own store has none) and folds the rest.
    c_dir = tmp_path / "state-c"
    assert restore_newest_snapshot(vol.stores["a"], c_dir, at_or_below=None) == snap.offset
    with State.open(c_dir) as c:
        assert c.applied_offset() == snap.offset
        fold_range(lg, c)
        assert c.applied_offset() == head
        assert c.digest() == vol.state("a").digest() == vol.state("b").digest()
        assert c.recompute_digest() == c.digest()

    # A full replay from offset 0 lands on the same digest.
    with State.open(tmp_path / "full") as full:
        fold_range(lg, full)
        assert full.digest() == vol.state("a").digest()

    # At an offset between: the snapshot + log rebuild equals a replay to there.
    mid = (snap.offset + head) // 2
    with (
        rebuild_state(lg, tmp_path / "mid", stores=vol.stores, volume=vol.name, to_offset=mid) as s,
        State.open(tmp_path / "mid-full") as ref,
    ):
        fold_range(lg, ref, to_offset=mid)
        assert (s.applied_offset(), s.digest()) == (mid, ref.digest())
    # Below the snapshot, a rebuild cannot use it and replays from 0.
    with rebuild_state(
        lg, tmp_path / "early", stores=vol.stores, volume=vol.name, to_offset=snap.offset - 3
    ) as s:
        assert s.applied_offset() == snap.offset - 3


@pytest.mark.s3
def test_snapshot_on_s3_is_verified_and_damaged_ones_are_skipped(
    s3_store_url: str, tmp_path: Path
) -> None:
    vol = OpsVolume.create(f"sqlite://{tmp_path / 'log.db'}", "vol", tmp_path, {"a": s3_store_url})
    try:
        churn(vol, 10, seed=4)
        lg = vol.open_log()
        old, _ = create_snapshot(lg, vol.stores, volume=vol.name, region="a")
        churn(vol, 10, seed=5)
        new, _ = create_snapshot(lg, vol.stores, volume=vol.name, region="a")
        store = vol.stores["a"]
        assert [s.id for s in list_snapshots(store)] == [old.id, new.id]

        # A flipped byte in the newest snapshot: its checksum fails, the older one is used.
        f = max(new.files, key=lambda f: f.size)
        key = part_key(new.id, f.name, 0)
        raw = bytearray(store.get(key))
        raw[len(raw) // 2] ^= 0xFF
        store.put(key, bytes(raw))
        assert restore_newest_snapshot(store, tmp_path / "r1", at_or_below=None) == old.offset
        with State.open(tmp_path / "r1") as s:
            assert s.digest_hex() == old.digest

        # A snapshot without its manifest is never listed or used.
        store.delete(manifest_key(old.id))
        assert list_incomplete(store) == [old.id]
        assert restore_newest_snapshot(store, tmp_path / "r2", at_or_below=None) is None
        assert not (tmp_path / "r2").exists()
        assert prune_snapshots(store, 1, incomplete_grace_s=0) == [old.id]
        assert list_incomplete(store) == []
    finally:
        vol.close()


def test_snapshot_parts_and_prune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files are cut into parts; prune keeps the newest and deletes manifests first."""
    import tidefs.replica.snapshot as snapshot_module

    monkeypatch.setattr(snapshot_module, "PART_SIZE", 4096)
    assert PART_SIZE > 4096
    vol = OpsVolume.create(
        f"sqlite://{tmp_path / 'log.db'}", "vol", tmp_path, {"a": (tmp_path / "sa").as_uri()}
    )
    try:
        ids = []
        for seed in range(4):
            churn(vol, 8, seed=seed)
            snap, _ = create_snapshot(vol.open_log(), vol.stores, volume="vol", region="a")
            ids.append(snap.id)
        assert any(f.parts > 1 for f in snap.files)
        store = vol.stores["a"]
        assert prune_snapshots(store, 2, dry_run=True) == ids[:2]
        assert [s.id for s in list_snapshots(store)] == ids
        assert prune_snapshots(store, 2) == ids[:2]
        assert [s.id for s in list_snapshots(store)] == ids[2:]
        assert not list(store.list(f"snapshots/{ids[0]}/"))
        assert restore_newest_snapshot(store, tmp_path / "r", at_or_below=None) == snap.offset
    finally:
        vol.close()


def test_snapshot_cli_from_a_locked_state_dir(tmp_path: Path) -> None:
    """`tidefs snapshot --state-dir` copies a state a mount holds, at its own offset."""
    url = f"sqlite://{tmp_path / 'log.db'}"
    vol = OpsVolume.create(url, "vol", tmp_path, {"a": (tmp_path / "sa").as_uri()})
    try:
        churn(vol, 10, seed=7)
        state = vol.state("a")  # open for writing: the lock a mount would hold
        out = run_cli(
            "snapshot",
            "vol",
            "--journal",
            url,
            "--region",
            "a",
            "--state-dir",
            str(vol.state_dir("a")),
            "--json",
            "-q",
        )
        made = json.loads(out.stdout)
        assert made["new"] and made["offset"] == state.applied_offset()
        assert made["digest"] == state.digest_hex()
        churn(vol, 3, seed=8)
        loud = run_cli("snapshot", "create", "vol", "--journal", url, "--region", "a")
        assert "records folded:" in loud.stderr and "bytes uploaded:" in loud.stderr, loud.stderr
        listed = json.loads(
            run_cli("snapshot", "list", "vol", "--journal", url, "--region", "a", "--json").stdout
        )
        assert [s["offset"] for s in listed["snapshots"]] == [
            made["offset"],
            vol.open_log().head() - 1,
        ]
        pruned = json.loads(
            run_cli(
                "snapshot",
                "prune",
                "vol",
                "--journal",
                url,
                "--region",
                "a",
                "--keep",
                "1",
                "--json",
            ).stdout
        )
        assert pruned["deleted"] == [made["id"]]
        bad = run_cli("snapshot", "vol", "--journal", url, "--region", "zz", check=False)
        assert bad.returncode == 1 and "no region 'zz'" in bad.stderr
    finally:
        vol.close()


def test_snapshot_survives_sigkill(tmp_path: Path) -> None:
    """A snapshot killed at any point is never usable half-made; a rerun completes it."""
    url = f"sqlite://{tmp_path / 'log.db'}"
    urls = {"a": (tmp_path / "sa").as_uri(), "b": (tmp_path / "sb").as_uri()}
    vol = OpsVolume.create(url, "vol", tmp_path, urls)
    try:
        churn(vol, 40, seed=9)
        d = vol.mkdir(ROOT_INODE, b"many")
        for i in range(600):  # a state big enough that a snapshot takes a while
            vol.submit(Mknod(d, b"n%04d" % i, 0o100644, 0, 0))
        head = vol.sync("a")
        want = vol.state("a").digest_hex()
        store = vol.stores["a"]
        common = ["vol", "--journal", url, "-q", "--work-dir", str(tmp_path)]
        took = timed_run("snapshot", *common, "--region", "b")  # the same work, elsewhere
        rng = random.Random(1)
        killed = 0
        for attempt in range(6):
            if (
                kill_during(["snapshot", *common, "--region", "a"], rng.uniform(0.2, 1.0) * took)
                is None
            ):
                killed += 1
            for snap in list_snapshots(store):  # whatever is listed must be whole
                dest = tmp_path / f"check-{attempt}-{snap.id}"
                assert restore_newest_snapshot(store, dest, at_or_below=snap.offset) == snap.offset
        assert killed >= 3
        run_cli("snapshot", *common, "--region", "a")
        snaps = list_snapshots(store)
        assert [(s.offset, s.digest) for s in snaps] == [(head, want)]
        # An interrupted run's parts are pruned once they are old enough.
        prune_snapshots(store, 1, incomplete_grace_s=0)
        assert list_incomplete(store) == []
    finally:
        vol.close()


def test_log_trim_point(tmp_path: Path) -> None:
    """The log may lose records below the newest snapshot under the window and every region."""
    t0, second = 1_700_000_000_000_000_000, 1_000_000_000
    url = f"sqlite://{tmp_path / 'log.db'}"
    vol = OpsVolume.create(
        url, "vol", tmp_path, {"a": (tmp_path / "sa").as_uri()}, retention_s=30, timestamp_ns=t0
    )
    try:
        lg = vol.open_log()
        snaps = []
        for i in range(1, 21):  # offset i is stamped t0 + 10 i s
            vol.submit(
                Mkdir(ROOT_INODE, b"d%d" % i, 0o755, 0, 0), timestamp_ns=t0 + 10 * i * second
            )
            if i in (5, 15):
                snaps.append(create_snapshot(lg, vol.stores, volume="vol", region="a")[0])
        assert [s.offset for s in snaps] == [5, 15]

        def trim(applied: dict[str, int], now_s: int) -> int:
            return log_trim_point(
                lg, snaps, applied, ["a"], retention_s=30, now_ns=t0 + now_s * second
            )[0]

        assert trim({"a": 20}, 200) == 16  # the window starts at offset 17: snapshot 15 stays
        assert trim({"a": 10}, 200) == 11  # a region still folding from offset 11
        assert trim({"a": 20}, 100) == 6  # the window reaches back to offset 7: snapshot 5
        assert trim({"a": 20}, 40) == 0  # no snapshot is old enough
        assert trim({}, 200) == 0  # a region of unknown offset
        listed = json.loads(
            run_cli("snapshot", "list", "vol", "--journal", url, "--region", "a", "--json").stdout
        )
        assert (
            listed["log_trim_offset"] == 0
            and "published no applied offset" in listed["log_trim_reason"]
        )
    finally:
        vol.close()


def test_replay_of_an_empty_directory_starts_from_a_snapshot(
    ops_volume: Callable[..., OpsVolume], tmp_path: Path
) -> None:
    """`tidefs replay` into an empty directory starts from the newest snapshot at or below its target."""
    vol = ops_volume()
    churn(vol, 15, seed=4)
    lg = vol.open_log()
    snap, _ = create_snapshot(lg, vol.stores, volume=vol.name, region="b", work_dir=tmp_path)
    churn(vol, 10, seed=5)
    head = vol.sync("a")

    def replay(dest: Path, to_offset: int) -> tuple[dict[str, object], str]:
        proc = run_cli(
            "replay", vol.name, "--journal", vol.journal_url, "--state-dir", str(dest),
            "--to-offset", str(to_offset), "--json",
        )  # fmt: skip
        return json.loads(proc.stdout), proc.stderr

    def full_replay_digest(to_offset: int) -> str:
        with State.open(tmp_path / f"full-{to_offset}") as full:
            fold_range(lg, full, to_offset=to_offset)
            return full.digest_hex()

    mid = (snap.offset + head) // 2
    assert snap.offset < mid < head
    doc, err = replay(tmp_path / "from-snapshot", mid)
    assert f"starting from the snapshot at offset {snap.offset} (region b)" in err
    assert (doc["snapshot_offset"], doc["offset"]) == (snap.offset, mid)
    assert doc["digest"] == full_replay_digest(mid)

    # Below the snapshot there is nothing to start from: the replay begins at offset 0.
    doc, err = replay(tmp_path / "before-snapshot", snap.offset - 2)
    assert doc["snapshot_offset"] is None and "starting from" not in err
    assert doc["digest"] == full_replay_digest(snap.offset - 2)


@dataclass
class Trimmed:
    """A volume whose Kafka topic lost its records below `trim`; region b stopped at `stale`."""

    vol: OpsVolume
    snap: Snapshot
    stale: int
    head: int
    trim: int
    follower: Log
    """A log whose reader was positioned just after `stale` before the trim."""


def trimmed_volume(broker: KafkaBroker, tmp_path: Path) -> Trimmed:
    """Write a history, snapshot it in region a, trim the topic just above the snapshot."""
    urls = {"a": (tmp_path / "store-a").as_uri(), "b": (tmp_path / "store-b").as_uri()}
    name = f"trim-{uuid.uuid4().hex[:8]}"
    vol = OpsVolume.create(broker.url, name, tmp_path, urls)
    churn(vol, 8, seed=6)
    stale = vol.sync("b")  # region b stops here, below the trim point
    churn(vol, 8, seed=7)
    lg = vol.open_log()
    snap, _ = create_snapshot(lg, vol.stores, volume=name, region="a", work_dir=tmp_path)
    churn(vol, 5, seed=8)
    head = vol.sync("a")
    assert lg.start() == 0
    # Fetch one record at a time, so that the trim lands under this reader's feet.
    follower = open_log(
        broker.url, name, **{"max.partition.fetch.bytes": 1, "queued.min.messages": 1}
    )
    vol.logs.append(follower)
    assert [r.offset for r in follower.read(stale + 1, max_records=1)] == [stale + 1]
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    futures = admin.delete_records([TopicPartition(f"tidefs.{name}.log", 0, snap.offset + 1)])
    for future in futures.values():
        future.result(timeout=30)
    return Trimmed(vol, snap, stale, head, snap.offset + 1, follower)


def test_trimmed_kafka_log(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    """A trimmed topic: start() is its low watermark, old states fail clearly, new ones use snapshots."""
    t = trimmed_volume(kafka_broker, tmp_path)
    vol, snap, stale, head, trim = t.vol, t.snap, t.stale, t.head, t.trim
    name, urls = vol.name, vol.urls
    try:
        lg = vol.open_log()
        assert lg.start() == trim
        assert [r.offset for r in lg.read(trim, max_records=1)] == [trim]

        # Records below the start are gone: a read or a fold from there says so, never skips them.
        with pytest.raises(LogTrimmed, match=f"starts at offset {trim}.*snapshot"):
            lg.read(stale + 1)
        with pytest.raises(LogTrimmed):
            fold_range(lg, vol.state("b"))
        # A reader positioned before the trim never skips from a deleted record to the new
        # start: it gets the records it had fetched already, in order, then LogTrimmed.
        got: list[int] = []
        with pytest.raises(LogTrimmed):
            while stale + 2 + len(got) <= head:
                batch = t.follower.read(stale + 2 + len(got), max_records=100)
                assert batch
                got += [r.offset for r in batch]
        assert got == list(range(stale + 2, stale + 2 + len(got)))
        assert vol.state("b").applied_offset() == stale

        # `tidefs log` prints from where the log starts now and says so; --from below is refused.
        proc = run_cli("log", name, "--journal", kafka_broker.url, "--json", "--limit", "2")
        assert [json.loads(line)["offset"] for line in proc.stdout.splitlines()] == [
            trim,
            trim + 1,
        ]
        assert f"the log starts at offset {trim}" in proc.stderr
        proc = run_cli("log", name, "--journal", kafka_broker.url, "--from", "0", check=False)
        assert proc.returncode == 1 and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"starts at offset {trim}" in proc.stderr and f"--from {trim}" in proc.stderr
        assert "snapshot" not in proc.stderr
        copy_state(vol.state_dir("b"), tmp_path / "stale-b")
        proc = run_cli(
            "replay", name, "--journal", kafka_broker.url, "--state-dir",
            str(tmp_path / "stale-b"), check=False,
        )  # fmt: skip
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"starts at offset {trim}" in proc.stderr and "snapshot" in proc.stderr

        # `tidefs status` warns about region b, whose state is older than the log's start.
        for region, applied in (("a", head), ("b", stale)):
            report: dict[str, Any] = {"applied_offset": applied}
            publisher = StatusPublisher(kafka_broker.url, name, region, report.copy)
            publisher.publish()
            publisher.stop()
        status = read_status(kafka_broker.url, name)
        assert status["b"].state_before_log_start and not status["a"].state_before_log_start
        proc = run_cli("status", name, "--journal", kafka_broker.url)
        assert f"warning: region b is at offset {stale}, older than the log's start" in proc.stderr
        assert "region a" not in proc.stderr

        # Without a store to find snapshots in, an empty directory cannot start: one clear line.
        proc = run_cli(
            "replay", name, "--journal", kafka_broker.url, "--state-dir",
            str(tmp_path / "nowhere"), check=False,
        )  # fmt: skip
        assert proc.returncode == 1 and "--store" in proc.stderr, proc.stderr

        # A fresh state starts from the snapshot above the trim point and agrees with region a.
        proc = run_cli(
            "replay", name, "--journal", kafka_broker.url, "--state-dir",
            str(tmp_path / "fresh"), "--store", urls["a"], "--json",
        )  # fmt: skip
        doc = json.loads(proc.stdout)
        assert (doc["snapshot_offset"], doc["offset"]) == (snap.offset, head)
        assert doc["digest"] == vol.state("a").digest_hex()
    finally:
        vol.close()


def test_mounts_on_a_trimmed_kafka_log(
    kafka_broker: KafkaBroker, mount_factory: MountFactory, tmp_path: Path
) -> None:
    """A mount behind the log's start is refused with the way out; seeded from a snapshot, it works."""
    t = trimmed_volume(kafka_broker, tmp_path)
    vol = t.vol
    try:
        m = mount_factory(volume=vol.name, journal_url=kafka_broker.url, region="b", start=False)
        copy_state(vol.state_dir("b"), m.state_dir)
        with pytest.raises(RuntimeError, match=rf"starts at offset {t.trim}.*from a snapshot"):
            m.start()
        shutil.rmtree(m.state_dir)
        with pytest.raises(RuntimeError, match=r"holds no state: seed it from a snapshot"):
            m.start()
        run_cli(
            "replay", vol.name, "--journal", kafka_broker.url, "--store", vol.urls["a"],
            "--state-dir", str(m.state_dir), "-q",
        )  # fmt: skip
        m.start()
        names = sorted(os.fsdecode(name) for _c, name, _i in vol.state("a").readdir(ROOT_INODE))
        assert names and sorted(os.listdir(m.path)) == names
    finally:
        vol.close()
