"""The log contract: every backend behind `open_log` passes the same tests.

Each test that takes `journal_url` runs once per backend (test ids `[sqlite]`
and `[kafka]`; the Kafka ones carry the `kafka` marker). Payloads are unique
and traceable, so that a lost, duplicated or misplaced record is visible.
Offsets are compared with what `append` returned, never computed, because a
backend may leave gaps. The last part holds what only one backend has: its
URL, its file or its broker going away.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness.kafka import KafkaBroker, free_port
from tidefs.journal.log import (
    JournalConfigError,
    JournalError,
    JournalUnavailable,
    Log,
    Record,
    open_log,
)

TAIL_LATENCY_BOUND = 0.5
"""Seconds a blocked reader may take to see a record (the target is milliseconds; CI is slow)."""


def records_of(lg: Log, start: int = 0) -> list[Record]:
    """Read every record from `start` to the head."""
    out: list[Record] = []
    head = lg.head()
    while start < head:
        batch = lg.read(start, max_records=500, timeout=1.0)
        if not batch:
            break
        out += batch
        start = batch[-1].offset + 1
    return out


def run_child(code: str, *args: str) -> subprocess.Popen[str]:
    """Start a Python process running `code` with `args` in sys.argv, lines on stdout."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- the contract, for both backends --------------------------------------------


def test_empty_log(journal_url: str, journal_volume: str) -> None:
    with open_log(journal_url, journal_volume) as lg:
        assert lg.head() == 0
        assert lg.start() == 0
        assert lg.read(0) == []
        assert lg.offset_for_time(0) == 0
        assert lg.offset_for_time(time.time_ns()) == 0


def test_append_returns_increasing_offsets(journal_url: str, journal_volume: str) -> None:
    with open_log(journal_url, journal_volume) as lg:
        offsets = [lg.append(f"rec-{i}".encode()) for i in range(20)]
        assert offsets[0] == 0
        assert all(a < b for a, b in itertools.pairwise(offsets))
        assert lg.head() == offsets[-1] + 1
        got = records_of(lg)
        assert [(r.offset, r.payload) for r in got] == [
            (o, f"rec-{i}".encode()) for i, o in enumerate(offsets)
        ]


def test_read_from_arbitrary_offsets(journal_url: str, journal_volume: str) -> None:
    with open_log(journal_url, journal_volume) as lg:
        written = [(lg.append(f"rec-{i}".encode()), f"rec-{i}".encode()) for i in range(40)]
        head = lg.head()
        # Jump around, backwards too: a backend must reposition its reader.
        for start in (0, 39, 7, 20, 3, head - 1, 0, 25):
            for limit in (1, 5, 1000):
                got = [(r.offset, r.payload) for r in lg.read(start, max_records=limit)]
                expected = [w for w in written if w[0] >= start][:limit]
                # "Up to max_records": a prefix of what exists, never empty while records remain.
                assert got and got == expected[: len(got)], (start, limit)
        # Sequential following: start each read after the previous one.
        position, seen = 0, []
        while True:
            batch = lg.read(position, max_records=7)
            if not batch:
                break
            seen += [(r.offset, r.payload) for r in batch]
            position = batch[-1].offset + 1
        assert seen == written


def test_reads_match_a_model(journal_url: str, journal_volume: str) -> None:
    """Random appends and reads against a list of what was appended."""
    with open_log(journal_url, journal_volume) as lg:
        model: list[tuple[int, bytes]] = []

        @settings(max_examples=25, deadline=None, database=None)
        @given(
            payloads=st.lists(st.binary(max_size=64), max_size=6),
            where=st.floats(min_value=0, max_value=1),
            limit=st.integers(min_value=1, max_value=12),
        )
        def step(payloads: list[bytes], where: float, limit: int) -> None:
            for payload in payloads:
                model.append((lg.append(payload), payload))
            end = model[-1][0] + 2 if model else 2
            start = int(where * end)
            got = [(r.offset, r.payload) for r in lg.read(start, max_records=limit)]
            expected = [m for m in model if m[0] >= start][:limit]
            # A backend may return fewer records than exist (Kafka hands out what
            # it has fetched so far), but never none when some exist, and never others.
            assert got == expected[: len(got)]
            assert bool(got) == bool(expected)
            assert lg.head() == (model[-1][0] + 1 if model else 0)

        step()


def test_timestamps(journal_url: str, journal_volume: str) -> None:
    with open_log(journal_url, journal_volume) as lg:
        before = time.time_ns()
        first = lg.append(b"now")
        after = time.time_ns()
        exact = 1_700_000_000_123_456_789
        second = lg.append(b"given", exact)
        got = {r.offset: r.timestamp_ns for r in lg.read(0)}
        assert before <= got[first] <= after
        assert got[second] == exact  # nanoseconds survive, whatever the backend keeps


def test_offset_for_time(journal_url: str, journal_volume: str) -> None:
    with open_log(journal_url, journal_volume) as lg:
        base = 1_700_000_000_000_000_000
        # 0.4 ms apart: several records share a millisecond, which Kafka alone cannot tell apart.
        stamps = [base + i * 400_000 for i in range(12)]
        offsets = [lg.append(f"t{i}".encode(), ts) for i, ts in enumerate(stamps)]
        assert lg.offset_for_time(0) == offsets[0]
        assert lg.offset_for_time(base - 1) == offsets[0]
        for offset, ts in zip(offsets, stamps, strict=True):
            assert lg.offset_for_time(ts) == offset
        for i in range(len(stamps) - 1):
            assert lg.offset_for_time(stamps[i] + 1) == offsets[i + 1]
        assert lg.offset_for_time(stamps[-1] + 1) == lg.head()


def test_offset_for_time_with_disagreeing_clocks(journal_url: str, journal_volume: str) -> None:
    """Writers' clocks are not ordered: the answer is the first offset at or after the time."""
    with open_log(journal_url, journal_volume) as lg:
        base = 1_700_000_000_000_000_000
        seconds = [5, 3, 9, 1, 7]
        offsets = [lg.append(b"x", base + s * 1_000_000_000) for s in seconds]
        for query in range(11):
            ts = base + query * 1_000_000_000
            expected = next((o for o, s in zip(offsets, seconds, strict=True) if s >= query), None)
            assert lg.offset_for_time(ts) == (lg.head() if expected is None else expected), query


def test_blocking_tail_sees_append_from_another_thread(
    journal_url: str, journal_volume: str
) -> None:
    with open_log(journal_url, journal_volume) as lg:
        lg.append(b"before")
        head = lg.head()
        seen: list[tuple[list[Record], float]] = []

        def follow() -> None:
            records = lg.read(head, timeout=10)
            seen.append((records, time.perf_counter()))

        reader = threading.Thread(target=follow)
        reader.start()
        time.sleep(0.3)  # let the reader block on the tail
        assert not seen
        offset = lg.append(b"tail")
        committed = time.perf_counter()
        reader.join(10)
        (records, woke) = seen[0]
        assert [(r.offset, r.payload) for r in records] == [(offset, b"tail")]
        assert woke - committed < TAIL_LATENCY_BOUND


_APPEND_ON_GO = """
import sys, time
from tidefs.journal.log import open_log
with open_log(sys.argv[1], sys.argv[2]) as lg:
    lg.head()
    print("ready", flush=True)
    sys.stdin.readline()
    offset = lg.append(b"from another process")
    print(offset, time.time_ns(), flush=True)
"""


def test_blocking_tail_sees_append_from_another_process(
    journal_url: str, journal_volume: str
) -> None:
    with open_log(journal_url, journal_volume) as lg:
        child = run_child(_APPEND_ON_GO, journal_url, journal_volume)
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "ready", child.stderr
            seen: list[tuple[list[Record], int]] = []
            reader = threading.Thread(
                target=lambda: seen.append((lg.read(0, timeout=20), time.time_ns()))
            )
            reader.start()
            time.sleep(0.3)
            assert not seen
            child.stdin.write("go\n")
            child.stdin.flush()
            offset_text, committed_ns = child.stdout.readline().split()
            reader.join(20)
            records, woke_ns = seen[0]
            assert [(r.offset, r.payload) for r in records] == [
                (int(offset_text), b"from another process")
            ]
            # The reader may even wake before the child prints: only an upper bound holds.
            assert (woke_ns - int(committed_ns)) / 1e9 < TAIL_LATENCY_BOUND
        finally:
            child.kill()
            child.wait()


def test_read_past_head_returns_empty_after_timeout(journal_url: str, journal_volume: str) -> None:
    with open_log(journal_url, journal_volume) as lg:
        lg.append(b"only")
        for start, wait in ((lg.head(), 0.3), (lg.head() + 5, 0.2), (lg.head(), 0.0)):
            began = time.monotonic()
            assert lg.read(start, timeout=wait) == []
            elapsed = time.monotonic() - began
            assert wait - 0.01 <= elapsed < wait + 2.0
        # A reader parked beyond the head still gets the records from `start` on, no earlier ones.
        start = lg.head() + 1
        lg.append(b"skipped")
        offset = lg.append(b"wanted")
        if offset >= start:
            assert [r.payload for r in lg.read(start, timeout=5)] == [b"wanted"]


def test_concurrent_appends_from_64_threads(journal_url: str, journal_volume: str) -> None:
    threads, per_thread = 64, 20
    with open_log(journal_url, journal_volume) as lg:
        acked: list[list[tuple[int, bytes]]] = [[] for _ in range(threads)]
        errors: list[BaseException] = []
        gate = threading.Barrier(threads)

        def write(t: int) -> None:
            try:
                gate.wait()
                for i in range(per_thread):
                    payload = f"w{t}-{i}".encode()
                    acked[t].append((lg.append(payload), payload))
            except BaseException as exc:  # reported below, with the others
                errors.append(exc)

        workers = [threading.Thread(target=write, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert not errors
        everything = [a for per in acked for a in per]
        assert len(everything) == threads * per_thread
        assert len({o for o, _ in everything}) == len(everything), "two appends got one offset"
        for per in acked:  # one thread's appends are ordered as it made them
            assert [o for o, _ in per] == sorted(o for o, _ in per)
        stored = records_of(lg)
        assert sorted((r.offset, r.payload) for r in stored) == sorted(everything)
        payloads = [r.payload for r in stored]
        assert len(payloads) == len(set(payloads)), "a payload was stored twice"


_APPEND_MANY = """
import sys
from tidefs.journal.log import open_log
with open_log(sys.argv[1], sys.argv[2]) as lg:
    for i in range(int(sys.argv[4])):
        payload = f"{sys.argv[3]}-{i}".encode()
        print(lg.append(payload), payload.decode(), flush=True)
"""


def test_concurrent_appends_from_several_processes(journal_url: str, journal_volume: str) -> None:
    with open_log(journal_url, journal_volume) as lg:
        lg.head()
        children = [
            run_child(_APPEND_MANY, journal_url, journal_volume, f"p{n}", "40") for n in range(4)
        ]
        acked: list[tuple[int, bytes]] = []
        for child in children:
            out, err = child.communicate(timeout=120)
            assert child.returncode == 0, err
            acked += [(int(o), p.encode()) for o, p in (line.split() for line in out.splitlines())]
        assert len(acked) == 160
        assert len({o for o, _ in acked}) == 160
        assert sorted((r.offset, r.payload) for r in records_of(lg)) == sorted(acked)


_APPEND_UNTIL_KILLED = """
import sys, threading
from tidefs.journal.log import open_log
lg = open_log(sys.argv[1], sys.argv[2])
lock = threading.Lock()
def write(t):
    i = 0
    while True:
        payload = f"k{t}-{i}".encode() * 50
        offset = lg.append(payload)
        with lock:
            print(offset, t, i, flush=True)
        i += 1
for t in range(8):
    threading.Thread(target=write, args=(t,), daemon=True).start()
threading.Event().wait()
"""


def test_killed_writer_leaves_only_whole_records(journal_url: str, journal_volume: str) -> None:
    """A writer killed mid-append loses nothing it acknowledged and leaves no torn record."""
    child = run_child(_APPEND_UNTIL_KILLED, journal_url, journal_volume)
    acked: dict[int, bytes] = {}
    try:
        assert child.stdout is not None
        while len(acked) < 200:
            line = child.stdout.readline()
            assert line, child.stderr.read() if child.stderr else ""
            offset_text, t, i = line.split()
            acked[int(offset_text)] = f"k{t}-{i}".encode() * 50
    finally:
        child.kill()
        child.wait()
    with open_log(journal_url, journal_volume) as lg:
        stored = {r.offset: r.payload for r in records_of(lg)}
    for offset, payload in acked.items():
        assert stored.get(offset) == payload, offset
    for payload in stored.values():  # every stored record is whole: one payload repeated 50 times
        unit = payload[: len(payload) // 50]
        assert payload == unit * 50 and unit.startswith(b"k")
    assert len(set(stored.values())) == len(stored)


def test_reopen_sees_everything(journal_url: str, journal_volume: str) -> None:
    with open_log(journal_url, journal_volume) as lg:
        written = [(lg.append(f"r{i}".encode(), 1_000 + i), f"r{i}".encode()) for i in range(30)]
        head = lg.head()
    with open_log(journal_url, journal_volume) as lg:
        assert lg.head() == head
        got = records_of(lg)
        assert [(r.offset, r.payload) for r in got] == written
        assert [r.timestamp_ns for r in got] == [1_000 + i for i in range(30)]
        assert lg.append(b"after reopen") >= head


def test_volumes_are_isolated(journal_url: str, journal_volume: str) -> None:
    with (
        open_log(journal_url, journal_volume + "a") as a,
        open_log(journal_url, journal_volume + "b") as b,
    ):
        assert a.append(b"in a") == 0
        assert a.append(b"in a again") == 1
        assert b.head() == 0
        assert b.read(0) == []
        assert b.append(b"in b") == 0
        assert [r.payload for r in a.read(0)] == [b"in a", b"in a again"]
        assert [r.payload for r in b.read(0)] == [b"in b"]


def test_large_payload(journal_url: str, journal_volume: str) -> None:
    payload = os.urandom(1 << 20)
    with open_log(journal_url, journal_volume) as lg:
        small = lg.append(b"small")
        big = lg.append(payload)
        after = lg.append(b"after")
        got = records_of(lg)  # a backend may return fewer records than asked for: read on
        assert [(r.offset, r.payload) for r in got] == [
            (small, b"small"),
            (big, payload),
            (after, b"after"),
        ]


def test_bad_arguments(journal_url: str, journal_volume: str) -> None:
    with open_log(journal_url, journal_volume) as lg:
        with pytest.raises(TypeError):
            lg.append("not bytes")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            lg.read(-1)
        with pytest.raises(ValueError):
            lg.append(b"x", -5)
        assert lg.read(0, max_records=0) == []


def test_closed_log_refuses_work(journal_url: str, journal_volume: str) -> None:
    lg = open_log(journal_url, journal_volume)
    lg.append(b"x")
    lg.close()
    lg.close()  # idempotent
    with pytest.raises(JournalError):
        lg.append(b"y")
    with pytest.raises(JournalError):
        lg.read(0)


# -- URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("sqlite://host/log.db", id="sqlite-with-host"),
        pytest.param("sqlite://", id="sqlite-no-path"),
        pytest.param("sqlite:///tmp/", id="sqlite-directory-url"),
        pytest.param("sqlite:///tmp/x.db?bogus=1", id="sqlite-unknown-option"),
        pytest.param("sqlite:///tmp/x.db?timeout=soon", id="sqlite-bad-timeout"),
        pytest.param("sqlite:///tmp/x.db?synchronous=off", id="sqlite-unsafe-sync"),
        pytest.param("kafka://", id="kafka-no-broker"),
        pytest.param("kafka://127.0.0.1", id="kafka-no-port"),
        pytest.param("kafka://127.0.0.1:http", id="kafka-bad-port"),
        pytest.param("kafka://127.0.0.1:9092/topic", id="kafka-with-path"),
        pytest.param("kafka://127.0.0.1:9092?linger=5", id="kafka-unknown-option"),
        pytest.param("kafka://127.0.0.1:9092?timeout=-1", id="kafka-bad-timeout"),
        pytest.param(
            "kafka://127.0.0.1:9092?socket.timeout.ms=many", id="kafka-bad-client-setting"
        ),
        pytest.param("postgres://db/log", id="unknown-scheme"),
        pytest.param("/just/a/path", id="no-scheme"),
    ],
)
def test_malformed_url_is_a_config_error(url: str) -> None:
    began = time.monotonic()
    with pytest.raises(JournalConfigError):
        open_log(url, "vol")
    assert time.monotonic() - began < 2


@pytest.mark.kafka
def test_kafka_volume_name_must_fit_a_topic() -> None:
    with pytest.raises(JournalConfigError):
        open_log("kafka://127.0.0.1:9", "no spaces/slashes")


# -- SQLite: the file and the machine ---------------------------------------------


def test_sqlite_missing_directory_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "log.db"
    began = time.monotonic()
    with pytest.raises(JournalUnavailable, match=str(path.parent)):
        open_log(f"sqlite://{path}", "vol")
    assert time.monotonic() - began < 1


@pytest.mark.parametrize(
    "case", ["is-a-directory", "under-a-file", "read-only-file", "read-only-dir"]
)
def test_sqlite_unwritable_path_is_unavailable(tmp_path: Path, case: str) -> None:
    if case.startswith("read-only") and os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    if case == "is-a-directory":
        path = tmp_path / "log.db"
        path.mkdir()
    elif case == "under-a-file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "log.db"
    elif case == "read-only-file":
        path = tmp_path / "log.db"
        open_log(f"sqlite://{path}", "vol").close()
        path.chmod(0o444)
    else:
        path = tmp_path / "ro" / "log.db"
        path.parent.mkdir()
        path.parent.chmod(0o555)
    began = time.monotonic()
    with pytest.raises(JournalUnavailable) as info:
        open_log(f"sqlite://{path}", "vol")
    assert str(path.parent) in str(info.value)
    assert time.monotonic() - began < 1


def test_sqlite_refuses_a_foreign_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(JournalConfigError, match="not a tidefs journal"):
        open_log(f"sqlite://{path}", "vol")


def test_sqlite_groups_concurrent_appends(tmp_path: Path) -> None:
    from tidefs.journal.sqlite import SqliteLog

    with SqliteLog(tmp_path / "log.db", "vol") as lg:
        assert isinstance(lg, SqliteLog)
        gate = threading.Barrier(32)

        def write() -> None:
            gate.wait()
            for _ in range(20):
                lg.append(b"x")

        workers = [threading.Thread(target=write) for _ in range(32)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert lg.head() == 640
        assert lg.batches < 640 / 2, "concurrent appends were not committed together"


def test_sqlite_writers_that_take_turns_on_one_file(tmp_path: Path) -> None:
    """Two writers of one volume (two mounts on one machine) never reuse an offset.

    Each writer appends straight after its own last record while nobody else
    wrote in between; when the other writer did, it must notice and append
    after the newest record instead.
    """
    from tidefs.journal.sqlite import SqliteLog

    path = tmp_path / "log.db"
    with SqliteLog(path, "vol") as a, SqliteLog(path, "vol") as b:
        acked = {}
        for i in range(6):
            writer, other = (a, b) if i % 3 else (b, a)
            for n in range(1 + i % 2):
                payload = f"{i}-{n}".encode()
                acked[writer.append(payload, 1_000 + i)] = payload
            assert writer.head() == other.head() == len(acked)
        assert sorted(acked) == list(range(len(acked)))
        assert [(r.offset, r.payload) for r in a.read(0, 100)] == sorted(acked.items())
        # Both kept appending after each other's records, timestamps included.
        last_turn = min(o for o, p in acked.items() if p.startswith(b"5-"))
        assert a.offset_for_time(1_005) == b.offset_for_time(1_005) == last_turn

        gate = threading.Barrier(8)
        got: list[tuple[int, bytes]] = []

        def write(lg: SqliteLog, t: int) -> None:
            gate.wait()
            for i in range(25):
                payload = f"t{t}-{i}".encode()
                offset = lg.append(payload)
                got.append((offset, payload))

        workers = [threading.Thread(target=write, args=((a, b)[t % 2], t)) for t in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert len({o for o, _ in got}) == 200
        stored = {r.offset: r.payload for r in b.read(len(acked), 1000)}
        assert stored == dict(got)


def test_sqlite_options_from_url_and_keywords(tmp_path: Path) -> None:
    from tidefs.journal.sqlite import SqliteLog

    url = f"sqlite://{tmp_path / 'log.db'}?synchronous=normal&timeout=3"
    with open_log(url, "vol", poll_interval=0.001) as lg:
        assert isinstance(lg, SqliteLog)
        assert (lg.synchronous, lg.timeout, lg.poll_interval) == ("normal", 3.0, 0.001)


def test_sqlite_busy_file_times_out(tmp_path: Path) -> None:
    """A writer that holds the lock forever makes append fail after the timeout, not hang."""
    path = tmp_path / "log.db"
    with open_log(f"sqlite://{path}?timeout=0.5", "vol") as lg:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            began = time.monotonic()
            with pytest.raises(JournalUnavailable, match="locked"):
                lg.append(b"x")
            assert time.monotonic() - began < 3
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert lg.append(b"x") == 0


# -- Kafka: the broker going away -----------------------------------------------------


@pytest.mark.kafka
def test_kafka_unreachable_broker_at_open() -> None:
    port = free_port()  # nothing listens there
    began = time.monotonic()
    with pytest.raises(JournalUnavailable, match=f"127.0.0.1:{port}"):
        open_log(f"kafka://127.0.0.1:{port}?timeout=2", "vol")
    assert time.monotonic() - began < 2 + 3


@pytest.mark.kafka
def test_kafka_broker_lost_and_back(kafka_broker_factory: Callable[[], KafkaBroker]) -> None:
    """Append fails within the bound while the broker is down and works again once it is back."""
    broker = kafka_broker_factory()
    with open_log(broker.url, "chaos", timeout=3) as lg:
        first = lg.append(b"before")
        broker.stop()
        began = time.monotonic()
        with pytest.raises(JournalUnavailable):
            lg.append(b"while down")
        assert time.monotonic() - began < 3 + 3
        with pytest.raises(JournalUnavailable):
            lg.head()
        broker.start()
        deadline = time.monotonic() + 60
        while True:  # the client reconnects by itself; the first tries may still time out
            try:
                after = lg.append(b"after")
                break
            except JournalUnavailable:
                assert time.monotonic() < deadline
        payloads = [r.payload for r in records_of(lg)]
        assert payloads[0] == b"before" and payloads[-1] == b"after"
        assert first < after
        assert set(payloads) <= {b"before", b"while down", b"after"}


@pytest.mark.kafka
def test_kafka_topic_layout(kafka_broker: KafkaBroker, journal_volume: str) -> None:
    """One partition, kept forever: the log is the source of truth."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    with open_log(kafka_broker.url, journal_volume):
        pass
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    topic = f"tidefs.{journal_volume}.log"
    assert len(admin.list_topics(timeout=10).topics[topic].partitions) == 1
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert config["retention.ms"].value == "-1"
    assert config["retention.bytes"].value == "-1"
