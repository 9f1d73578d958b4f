"""Schema evolution: records from a newer tidefs stop the fold just before them, on both journals.

A "future" record comes in two kinds: one written with a schema this tidefs
does not have (a v3 with a command it has never heard of, so an unknown
fingerprint), and an `EnableFeatures` it can decode but that enables a schema
version and a feature it does not know. Either way the fold stops just
before it, says what to upgrade, the state stays at the offset before, and a
mount keeps serving what it had. Writers encode with the volume's enabled
schema version, so that older readers keep working until `tidefs upgrade`.
"""

from __future__ import annotations

import copy
import io
import json
import time
from pathlib import Path

import fastavro
import pytest

from tests.harness.mount import MountFactory
from tests.test_snapshot import run_cli
from tidefs.fs.volume import format_volume
from tidefs.journal import codec, features
from tidefs.journal.commands import (
    ROOT_INODE,
    CommitSlice,
    CreateVolume,
    EnableFeatures,
    Envelope,
    Mkdir,
    Mknod,
    Region,
    RemoveRegion,
    SliceRef,
    new_request_id,
)
from tidefs.journal.log import open_log
from tidefs.replica.blocks import block_key, new_slice_id
from tidefs.replica.replica import CommandRejected, FoldStopped, Replica, fold_range
from tidefs.replica.replicator import Replicator
from tidefs.replica.state import State
from tidefs.replica.status import StatusPublisher, knowledge_fields, read_status
from tidefs.replica.store import open_store

REGIONS = (Region("a", "file:///unused-a"), Region("b", "file:///unused-b"))


def future_schema_record(origin: str = "a") -> bytes:
    """A record as a tidefs of a schema v3, with a command this tidefs has never heard of, writes."""
    schema = json.loads(codec.CURRENT.canonical_form)
    union = next(f for f in schema["fields"] if f["name"] == "command")["type"]
    union.append(
        {
            "type": "record",
            "name": "tidefs.FromTheFuture",
            "fields": [{"name": "x", "type": "long"}],
        }
    )
    parsed = fastavro.parse_schema(copy.deepcopy(schema), named_schemas={})
    buf = io.BytesIO()
    datum = {
        "request_id": new_request_id(),
        "origin": origin,
        "timestamp_ns": time.time_ns(),
        "command": ("tidefs.FromTheFuture", {"x": 7}),
    }
    fastavro.schemaless_writer(buf, parsed, datum)
    return codec.MARKER + codec.schema_fingerprint(parsed) + buf.getvalue()


def future_feature_record(origin: str = "a") -> bytes:
    """An EnableFeatures this tidefs decodes, enabling a schema version and a feature it lacks."""
    future = EnableFeatures(codec.CURRENT_VERSION + 1, ("from_the_future",))
    return codec.encode(Envelope(future, origin, time.time_ns()), codec.CURRENT_VERSION)


FUTURE = {"schema": future_schema_record, "feature": future_feature_record}
SAYS = {
    "schema": "unknown schema fingerprint",
    "feature": f"schema v{codec.CURRENT_VERSION + 1} and feature(s) from_the_future",
}


@pytest.mark.parametrize("kind", sorted(FUTURE))
def test_the_fold_stops_just_before_a_future_record(
    kind: str, journal_url: str, journal_volume: str, tmp_path: Path
) -> None:
    a = Replica(open_log(journal_url, journal_volume), State.open(tmp_path / "a"), "a").start()
    try:
        assert a.submit(CreateVolume(journal_volume, REGIONS, "a")).ok
        assert a.submit(features.enable_all()).ok
        assert a.submit(Mkdir(ROOT_INODE, b"d", 0o40755, 0, 0)).ok
        before = (a.state.applied_offset(), a.state.digest())
        future = a.log.append(FUTURE[kind]())
        assert future == before[0] + 1
        with pytest.raises(FoldStopped) as stopped:
            a.submit(Mkdir(ROOT_INODE, b"e", 0o40755, 0, 0), timeout=20)
        message = str(stopped.value)
        assert f"record at offset {future}" in message and SAYS[kind] in message
        assert "upgrade tidefs" in message and "\n" not in message
        assert (a.state.applied_offset(), a.state.digest()) == before
        assert a.state.lookup(ROOT_INODE, b"d") is not None  # what it had, it still has

        # A fresh region replaying the log stops at the same place, with the same state.
        with open_log(journal_url, journal_volume) as lg, State.open(tmp_path / "r") as rebuilt:
            with pytest.raises(codec.CodecError, match=f"record at offset {future}"):
                fold_range(lg, rebuilt)
            assert (rebuilt.applied_offset(), rebuilt.digest()) == before
    finally:
        a.stop()
        a.state.close()
        a.log.close()


@pytest.mark.parametrize("kind", sorted(FUTURE))
def test_a_mount_keeps_serving_behind_a_future_record(
    kind: str,
    journal_url: str,
    journal_volume: str,
    tmp_path: Path,
    mount_factory: MountFactory,
) -> None:
    store = (tmp_path / "store-a").as_uri()
    format_volume(
        journal_url,
        journal_volume,
        [Region("a", store)],
        "a",
        block_size=64 << 10,
        chunk_size=256 << 10,
    )
    m = mount_factory(volume=journal_volume, journal_url=journal_url)
    (m.path / "kept").write_bytes(b"written before the future\n")
    (m.path / "dir").mkdir()
    with open_log(journal_url, journal_volume) as lg:
        future = lg.append(FUTURE[kind]())

    # The mount's region stops just before it and says so (its status shows the offset).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if f"record at offset {future}" in m.log_tail(200):
            break
        time.sleep(0.2)
    tail = m.log_tail(200)
    assert f"fold stopped: record at offset {future}" in tail, tail
    assert "upgrade tidefs" in tail
    deadline = time.monotonic() + 30
    while read_status(journal_url, journal_volume)["a"].applied_offset != future - 1:
        assert time.monotonic() < deadline, read_status(journal_url, journal_volume)
        time.sleep(0.3)

    # It still serves what it had.
    assert m.running
    assert (m.path / "kept").read_bytes() == b"written before the future\n"
    assert sorted(p.name for p in m.path.iterdir()) == ["dir", "kept"]
    assert (m.path / "dir").is_dir()


def test_a_volume_at_an_older_schema_gets_records_of_that_schema(tmp_path: Path) -> None:
    """format --schema-version 1: every record stays readable by a tidefs of schema v1."""
    url = f"sqlite://{tmp_path / 'log.db'}"
    store = (tmp_path / "store-a").as_uri()
    run_cli("format", "v", "--journal", url, "--region", f"a={store}", "--schema-version", "1")
    with open_log(url, "v") as lg, State.open(tmp_path / "a") as state:
        a = Replica(lg, state, "a")
        assert a.submit(Mkdir(ROOT_INODE, b"d", 0o40755, 0, 0)).ok
        assert state.features() == features.LEGACY
        with pytest.raises(
            CommandRejected, match=r"needs the feature 'region_remove'.*tidefs upgrade v"
        ):
            a.submit(RemoveRegion("a"))
        records = lg.read(0, max_records=100, timeout=1.0)
        assert len(records) == 2
        v1 = codec.VERSIONS[1].fingerprint
        assert all(r.payload[2 : codec.HEADER_SIZE] == v1 for r in records)

    # A fresh format enables everything its tidefs knows, in the same append.
    run_cli("format", "w", "--journal", url, "--region", f"a={store}")
    with open_log(url, "w") as lg, State.open(tmp_path / "w") as state:
        fold_range(lg, state)
        assert state.features() == features.Enabled(codec.CURRENT_VERSION, features.KNOWN)
        a = Replica(lg, state, "a")
        assert a.submit(Mkdir(ROOT_INODE, b"d", 0o40755, 0, 0)).ok
        records = lg.read(0, max_records=100, timeout=1.0)
        assert [type(codec.decode(r.payload).command) for r in records] == [
            CreateVolume,
            EnableFeatures,
            Mkdir,
        ]
        assert all(r.payload[2 : codec.HEADER_SIZE] == codec.CURRENT_FINGERPRINT for r in records)

    bad = run_cli(
        "format",
        "x",
        "--journal",
        url,
        "--region",
        f"a={store}",
        "--schema-version",
        "9",
        check=False,
    )
    assert bad.returncode == 2 and "not a schema version this tidefs writes" in bad.stderr


def test_upgrade_waits_for_every_region_that_published(
    journal_url: str, journal_volume: str, tmp_path: Path
) -> None:
    store_a, store_b = (tmp_path / "store-a").as_uri(), (tmp_path / "store-b").as_uri()
    run_cli(
        "format", journal_volume, "--journal", journal_url, "--region", f"a={store_a}",
        "--region", f"b={store_b}", "--schema-version", "1",
    )  # fmt: skip
    upgrade = ["upgrade", journal_volume, "--journal", journal_url, "-q"]

    # Region b still runs a tidefs that published no knowledge (an older one): refused.
    StatusPublisher(journal_url, journal_volume, "a", knowledge_fields).publish()
    old_b = StatusPublisher(journal_url, journal_volume, "b", lambda: {"applied_offset": 0})
    old_b.publish()
    status = json.loads(
        run_cli("status", journal_volume, "--journal", journal_url, "--json").stdout
    )
    assert status["a"]["knows_schema"] == codec.CURRENT_VERSION
    assert status["a"]["knows_features"] == sorted(features.KNOWN)
    assert status["b"]["knows_schema"] == 0
    refused = run_cli(*upgrade, check=False)
    assert refused.returncode == 1
    assert (
        refused.stderr.count("\n") == 1
        and "region b runs a tidefs that knows an older schema" in refused.stderr
    )
    assert "--force" in refused.stderr
    with open_log(journal_url, journal_volume) as lg:
        assert lg.head() == 1  # nothing appended

    # A second mount of b with a newer tidefs is not enough: the old one would stop its fold.
    new_b = StatusPublisher(journal_url, journal_volume, "b", knowledge_fields)
    new_b.publish()
    refused = run_cli(*upgrade, check=False)
    assert refused.returncode == 1
    assert f"(mount {old_b.mount_id} on host {old_b.host})" in refused.stderr

    # Once the old mount has stopped (it says so), upgrade enables everything; again, it says so.
    old_b.stop(final=True)
    done = json.loads(run_cli(*upgrade, "--json").stdout)
    assert done["changed"] and done["schema_version"] == codec.CURRENT_VERSION
    assert done["features"] == sorted(features.KNOWN) and done["offset"] == 1
    assert done["before"] == {"schema_version": 1, "features": []}
    again = json.loads(run_cli(*upgrade, "--json").stdout)
    assert not again["changed"] and again["offset"] is None
    with open_log(journal_url, journal_volume) as lg:
        assert lg.head() == 2
        record = lg.read(1, max_records=1, timeout=1.0)[0]
        assert record.payload[2 : codec.HEADER_SIZE] == codec.CURRENT_FINGERPRINT


def test_upgrade_force(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'log.db'}"
    run_cli(
        "format",
        "v",
        "--journal",
        url,
        "--region",
        f"a={(tmp_path / 's').as_uri()}",
        "--schema-version",
        "1",
    )
    StatusPublisher(url, "v", "a", lambda: {"applied_offset": 0, "knows_schema": 1}).publish()
    refused = run_cli("upgrade", "v", "--journal", url, "-q", check=False)
    assert (
        refused.returncode == 1 and "region a runs a tidefs that knows schema v1" in refused.stderr
    )
    forced = run_cli("upgrade", "v", "--journal", url, "-q", "--force")
    assert f"now enables schema v{codec.CURRENT_VERSION}" in forced.stdout


def test_the_fold_gates_features_and_checks_enable_features(tmp_path: Path) -> None:
    """A RemoveRegion on a volume that has not enabled it is refused by the fold itself."""
    import errno

    t = time.time_ns()

    def apply(state: State, offset: int, command: object) -> int:
        env = Envelope(command, "a", t)  # type: ignore[arg-type]
        [outcome] = state.apply([(offset, env)]).outcomes
        return outcome.errno

    with State.open(tmp_path / "s") as state:
        assert apply(state, 0, CreateVolume("v", REGIONS, "a")) == 0
        assert apply(state, 1, RemoveRegion("b")) == errno.EOPNOTSUPP
        assert apply(state, 2, EnableFeatures(0, ())) == errno.EINVAL
        assert apply(state, 3, EnableFeatures(1, ("region_remove",))) == errno.EINVAL  # needs v2
        assert state.features() == features.LEGACY
        assert apply(state, 4, features.enable_all()) == 0
        assert state.features() == features.Enabled(codec.CURRENT_VERSION, features.KNOWN)
        assert apply(state, 5, RemoveRegion("a")) == errno.EBUSY  # the primary
        assert apply(state, 6, RemoveRegion("c")) == errno.ENOENT
        assert apply(state, 7, RemoveRegion("b")) == 0
        vol = state.volume()
        assert vol is not None and [r.name for r in vol.regions] == ["a"]
        assert apply(state, 8, EnableFeatures(1, ())) == 0  # never lowers the level
        assert state.features().schema_version == codec.CURRENT_VERSION


@pytest.mark.parametrize("feature", features.FEATURES, ids=lambda f: f.name)
def test_each_feature_is_what_its_schema_version_added(feature: features.Feature) -> None:
    """The rule that keeps the fold's feature check the same in every tidefs (features.py)."""

    def has(version: int) -> bool:
        named = codec.VERSIONS[version].schema["__named_schemas"]
        record = named.get(f"tidefs.{feature.command.__name__}")
        if record is None:
            return False
        return feature.field is None or feature.field in {f["name"] for f in record["fields"]}

    assert has(feature.schema_version), f"schema v{feature.schema_version} lacks it"
    assert not has(feature.schema_version - 1), "an older schema could already write it"
    assert feature.schema_version >= features.FIRST_FEATURE_SCHEMA
    assert features.BY_NAME[feature.name] is feature


@pytest.mark.parametrize("kind", sorted(FUTURE))
def test_the_replicator_stops_just_before_a_future_record(
    kind: str,
    journal_url: str,
    journal_volume: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It queues no block of a record past one it cannot read, as the fold folds none."""
    urls = {n: (tmp_path / f"store-{n}").as_uri() for n in "ab"}
    stores = {n: open_store(u) for n, u in urls.items()}
    a = Replica(open_log(journal_url, journal_volume), State.open(tmp_path / "a"), "a").start()
    b_log = open_log(journal_url, journal_volume)
    b_state = State.open(tmp_path / "b")
    replicator: Replicator | None = None

    def upload(ino: int) -> CommitSlice:
        sid = new_slice_id()
        stores["a"].put_block(block_key(sid, 0), b"x" * 100)
        return CommitSlice(ino, 0, SliceRef(sid, 0, 100, 64 << 10, "a"))

    try:
        regions = tuple(Region(n, u) for n, u in urls.items())
        create = CreateVolume(journal_volume, regions, "a", block_size=64 << 10)
        assert a.submit(create).ok
        assert a.submit(features.enable_all()).ok
        first, later = (a.submit(Mknod(ROOT_INODE, n, 0o100644, 0, 0)).inode for n in (b"f", b"g"))
        assert a.submit(upload(first)).ok
        future = a.log.append(FUTURE[kind]())
        after = Envelope(upload(later), "a", time.time_ns())
        a.log.append(codec.encode(after, codec.CURRENT_VERSION))
        with pytest.raises(codec.CodecError):
            fold_range(b_log, b_state)
        assert b_state.applied_offset() == future - 1

        replicator = Replicator(b_log, "b", stores, tmp_path / "progress-b", state=b_state)
        replicator.start()
        deadline = time.monotonic() + 20
        while replicator.stats().error is None and replicator.stats().log_position < future:
            assert time.monotonic() < deadline, replicator.stats()
            time.sleep(0.05)
        s = replicator.stats()
        assert s.log_position == future - 1
        assert s.error is not None and f"record at offset {future}" in s.error
        assert SAYS[kind] in s.error
        lines = [r.message for r in caplog.records if "stopped reading the log" in r.message]
        assert len(lines) == 1 and "\n" not in lines[0], lines
    finally:
        if replicator is not None:
            replicator.close()
        a.stop()
        for closing in (a.state, a.log, b_state, b_log, *stores.values()):
            closing.close()
