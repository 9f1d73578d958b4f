"""The Kafka log's tail fetcher, against a real KRaft broker.

A reader that follows the tail gets its records from `TailFetcher` (Kafka's
Fetch API spoken by tidefs) instead of librdkafka. What a reader relies on:
the same records, in the same order, with the same offsets, timestamps and
payloads as librdkafka hands out; nothing skipped or repeated while records
are appended concurrently; and when the fetcher cannot go on (a compressed
log, a stopped broker) reads carry on through librdkafka with its errors.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.kafka import KafkaBroker
from tidefs.journal.kafka import KafkaLog
from tidefs.journal.kafka_tail import TailFetcher, TailStopped, _varint
from tidefs.journal.log import JournalConfigError, JournalUnavailable, Record

pytestmark = pytest.mark.kafka


@pytest.fixture
def volume_logs(
    kafka_broker: KafkaBroker, journal_volume: str
) -> Iterator[tuple[KafkaLog, KafkaLog, KafkaLog]]:
    """A writer, a follower with the tail fetcher, and a reader without it, on one volume."""
    if not kafka_broker.running:
        kafka_broker.start()
    writer = KafkaLog(kafka_broker.bootstrap, journal_volume)
    follower = KafkaLog(kafka_broker.bootstrap, journal_volume)
    plain = KafkaLog(kafka_broker.bootstrap, journal_volume, tail_interval_ms=0)
    try:
        yield writer, follower, plain
    finally:
        for lg in (writer, follower, plain):
            lg.close()


def follow(lg: KafkaLog, start: int, until: int, limit: float = 60.0) -> list[Record]:
    """Read from `start` with waiting reads, as the fold does, until offset `until` is read."""
    out: list[Record] = []
    deadline = time.monotonic() + limit
    while (not out or out[-1].offset < until) and time.monotonic() < deadline:
        records = lg.read(start, max_records=50, timeout=0.2)
        out += records
        if records:
            start = records[-1].offset + 1
    return out


def read_all(lg: KafkaLog, start: int, until: int) -> list[Record]:
    out: list[Record] = []
    while not out or out[-1].offset < until:
        records = lg.read(start, max_records=1000)
        assert records, f"the log ends before offset {until}"
        out += records
        start = records[-1].offset + 1
    return out


def test_follower_reads_what_librdkafka_reads(
    volume_logs: tuple[KafkaLog, KafkaLog, KafkaLog],
) -> None:
    writer, follower, plain = volume_logs
    first = writer.append(b"first", 1_700_000_000_123_456_789)
    assert follow(follower, first, first)[0].payload == b"first"
    tail = follower._tail
    assert tail is not None and tail.failure is None, "the follower should read through the tail"

    # Payloads of every size class the varints encode, an empty one, and a
    # large one that spans many TCP segments; explicit and default timestamps.
    payloads = [b"", b"x", bytes(range(256)) * 3, b"y" * 70_000, b"z" * (3 << 20)]
    offsets = [writer.append(p, 1_700_000_000_000_000_000 + i) for i, p in enumerate(payloads)]
    offsets.append(writer.append(b"default timestamp"))
    got = follow(follower, first + 1, offsets[-1])
    want = read_all(plain, first + 1, offsets[-1])
    assert [(r.offset, r.timestamp_ns, r.payload) for r in got] == [
        (r.offset, r.timestamp_ns, r.payload) for r in want
    ]
    assert [r.payload for r in got] == [*payloads, b"default timestamp"]
    assert follower._tail is tail and tail.failure is None and tail.requests > 0


def test_concurrent_appends_arrive_once_and_in_order(
    volume_logs: tuple[KafkaLog, KafkaLog, KafkaLog],
) -> None:
    writer, follower, _plain = volume_logs
    start = writer.append(b"start")
    follow(follower, start, start)
    written: dict[int, bytes] = {}
    lock = threading.Lock()

    def write(worker: int) -> None:
        for i in range(150):
            payload = f"{worker}:{i}".encode()
            offset = writer.append(payload)
            with lock:
                written[offset] = payload

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    got: list[Record] = []
    at = start + 1
    deadline = time.monotonic() + 120
    while len(got) < 600 and time.monotonic() < deadline:
        records = follower.read(at, max_records=40, timeout=0.2)
        got += records
        if records:
            at = records[-1].offset + 1
    for t in threads:
        t.join()
    offsets = [r.offset for r in got]
    assert offsets == sorted(set(offsets)), "records repeated or out of order"
    assert {r.offset: r.payload for r in got} == written
    tail = follower._tail
    assert tail is not None and tail.failure is None


def test_two_followers_of_one_log_each_read_everything(
    volume_logs: tuple[KafkaLog, KafkaLog, KafkaLog],
) -> None:
    """A mount's fold and its replicator follow the same log object at the tail."""
    writer, follower, _plain = volume_logs
    start = writer.append(b"start")
    got: dict[str, list[Record]] = {"fold": [], "replicator": []}

    def run(name: str) -> None:
        got[name] = follow(follower, start, start + 300)

    readers = [threading.Thread(target=run, args=(name,)) for name in got]
    for t in readers:
        t.start()
    written = [writer.append(f"r{i}".encode()) for i in range(300)]
    for t in readers:
        t.join()
    for name, records in got.items():
        assert [r.offset for r in records] == [start, *written], name
        assert [r.payload for r in records[1:]] == [f"r{i}".encode() for i in range(300)], name


@contextlib.contextmanager
def fetcher(
    kafka_broker: KafkaBroker, volume: str, **options: Any
) -> Iterator[tuple[KafkaLog, int, TailFetcher]]:
    """A writer, the offset of its first record, and a tail fetcher started there."""
    with KafkaLog(kafka_broker.bootstrap, volume) as writer:
        first = writer.append(b"0")
        address = writer._leader_address(time.monotonic() + 10)
        tail = TailFetcher(address, writer.topic, first, timestamp_header="h", **options)
        try:
            yield writer, first, tail
        finally:
            tail.close()


def test_a_reader_behind_the_window_is_refused(
    kafka_broker: KafkaBroker, journal_volume: str
) -> None:
    """The fetcher keeps a bounded window; a reader older than it must read elsewhere."""
    with fetcher(kafka_broker, journal_volume, keep_records=8) as (writer, first, tail):
        offsets = [first] + [writer.append(str(i).encode()) for i in range(1, 40)]
        deadline = time.monotonic() + 30
        while not tail.covers(offsets[-1]) and time.monotonic() < deadline:
            time.sleep(0.01)
        newest = tail.take(offsets[-1], 10, 30.0)
        assert newest is not None and [r.offset for r in newest] == [offsets[-1]]
        assert tail.take(first, 10, 1.0) is None, "the oldest records were forgotten"
        kept = tail.take(offsets[-8], 100, 1.0)
        assert kept is not None and [r.offset for r in kept] == offsets[-8:]


def test_a_reader_ahead_of_the_fetch_is_served(
    kafka_broker: KafkaBroker, journal_volume: str
) -> None:
    """A fold that applied the records it appended itself reads on from beyond the fetch."""
    with fetcher(kafka_broker, journal_volume, ahead=100) as (writer, _first, tail):
        offsets = writer.append_many([(str(i).encode(), None) for i in range(1, 40)])
        # Offsets not appended yet, so surely beyond what was fetched.
        later: list[int] = []
        appender = threading.Timer(
            0.3, lambda: later.extend(writer.append_many([(b"x", None)] * 10))
        )
        appender.start()
        assert tail.covers(offsets[-1] + 5)
        got = tail.take(offsets[-1] + 5, 100, 30.0)
        appender.join()
        assert got is not None and [r.offset for r in got] == later[4:]
        assert tail.take(later[-1] + 102, 1, 0.1) is None, "too far ahead: read elsewhere"


def test_compressed_log_is_read_through_librdkafka(
    kafka_broker: KafkaBroker, journal_volume: str
) -> None:
    """The fetcher decodes uncompressed batches only; it stops and says why, nothing is lost."""
    if not kafka_broker.running:
        kafka_broker.start()
    url = f"{kafka_broker.url}?compression.type=gzip"
    with (
        KafkaLog.from_url(url, journal_volume) as writer,
        KafkaLog(kafka_broker.bootstrap, journal_volume) as follower,
    ):
        first = writer.append(b"a" * 1000)
        assert [r.payload for r in follow(follower, first, first)] == [b"a" * 1000]
        assert follower.tail_failure is not None and "compressed" in follower.tail_failure
        assert follower._tail_interval == 0, "a compressed log is no use trying again"
        more = [writer.append(f"b{i}".encode()) for i in range(5)]
        got = follow(follower, first + 1, more[-1])
        assert [r.payload for r in got] == [f"b{i}".encode() for i in range(5)]


def test_stopped_broker_raises_then_following_resumes(
    kafka_broker_factory: object, journal_volume: str
) -> None:
    broker: KafkaBroker = kafka_broker_factory()  # type: ignore[operator]
    with (
        KafkaLog(broker.bootstrap, journal_volume, timeout=3) as writer,
        KafkaLog(broker.bootstrap, journal_volume, timeout=3) as follower,
    ):
        first = writer.append(b"before")
        follow(follower, first, first)
        assert follower._tail is not None
        broker.stop()
        with pytest.raises(JournalUnavailable):
            # The tail's link closes; the read goes through librdkafka, whose bound holds.
            for _ in range(20):
                follower.read(first + 1, max_records=10, timeout=0.5)
        broker.start()
        after = writer.append(b"after")
        got = follow(follower, first + 1, after)
        assert [r.payload for r in got] == [b"after"]


def test_tail_options(kafka_broker: KafkaBroker, journal_volume: str) -> None:
    with pytest.raises(JournalConfigError, match="tail"):
        KafkaLog.from_url(f"{kafka_broker.url}?tail_interval_ms=-1", journal_volume)
    with pytest.raises(JournalConfigError, match="tail_connections"):
        KafkaLog.from_url(f"{kafka_broker.url}?tail_connections=0", journal_volume)
    with (
        KafkaLog(kafka_broker.bootstrap, journal_volume) as writer,
        KafkaLog.from_url(f"{kafka_broker.url}?tail_interval_ms=0", journal_volume) as plain,
    ):
        first = writer.append(b"one")
        assert [r.payload for r in follow(plain, first, first)] == [b"one"]
        assert plain._tail is None, "tail_interval_ms=0 turns the tail fetcher off"


def test_varint_decoding() -> None:
    """Zigzag varints as Kafka's record format writes them."""
    cases = {b"\x00": 0, b"\x01": -1, b"\x02": 1, b"\x7f": -64, b"\x80\x01": 64, b"\xac\x02": 150}
    for raw, value in cases.items():
        assert _varint(raw + b"\xff", 0) == (value, len(raw))
    with pytest.raises(TailStopped):
        _varint(b"\xff" * 11, 0)


def test_fetcher_refuses_a_broker_that_is_not_there() -> None:
    """No broker at the address: the fetcher stops with the reason and `take` says it cannot serve."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tail = TailFetcher(("127.0.0.1", port), "tidefs.none.log", 0, timestamp_header="h")
    try:
        assert tail.take(0, 10, 5.0) is None
        assert tail.failure is not None and "refused" in tail.failure.lower()
    finally:
        tail.close()


def test_fetcher_stops_when_the_broker_never_answers() -> None:
    """A link that swallows requests closes nothing: the overdue answer stops the fetcher."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        tail = TailFetcher(
            ("127.0.0.1", port),
            "tidefs.none.log",
            0,
            timestamp_header="h",
            idle_wait=0.1,
            connect_timeout=0.5,
        )
        try:
            assert tail.take(0, 10, 30.0) is None
            assert tail.failure is not None and "no answer" in tail.failure
        finally:
            tail.close()


def test_fetcher_asks_nothing_while_nobody_reads(
    kafka_broker: KafkaBroker, journal_volume: str
) -> None:
    """A fetcher no reader uses stops sending requests, and starts again for the next reader."""
    with KafkaLog(kafka_broker.bootstrap, journal_volume) as writer:
        first = writer.append(b"0")
        address = writer._leader_address(time.monotonic() + 10)
        tail = TailFetcher(
            address, writer.topic, first, timestamp_header="h", idle_wait=0.05, dormant_after=0.5
        )
        try:
            assert [r.payload for r in tail.take(first, 10, 30.0) or []] == [b"0"]
            deadline = time.monotonic() + 30
            before = -1
            while tail.requests != before and time.monotonic() < deadline:
                before = tail.requests
                time.sleep(1.5)  # several idle waits: a fetcher still asking would count them
            assert tail.requests == before, "a fetcher nobody reads keeps asking the broker"
            later = writer.append(b"1")
            got = tail.take(later, 10, 30.0)
            assert got is not None and [r.payload for r in got] == [b"1"]
            assert tail.requests > before
        finally:
            tail.close()


def test_a_record_acknowledged_before_a_short_read_is_returned(
    volume_logs: tuple[KafkaLog, KafkaLog, KafkaLog],
) -> None:
    """The read contract at the tail: records that exist when a read starts are returned,
    however short its timeout, whether the fetcher already has them or not."""
    writer, follower, _plain = volume_logs
    at = writer.append(b"start")
    follow(follower, at, at)
    for i in range(30):
        assert follower.read(at + 1, max_records=10, timeout=0.01) == []
        at = writer.append(f"r{i}".encode())
        got = follower.read(at, max_records=10, timeout=0.001)
        assert [r.payload for r in got] == [f"r{i}".encode()], i
    assert follower._tail is not None and follower._tail.failure is None
