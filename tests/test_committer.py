"""The mount's committer: many callers' commands appended as one batch and folded once.

`Log.append_many` is part of the log contract (both backends); `OwnRequests`
gathers commands from threads and from trio tasks into batches that
`Replica.submit_many` appends and folds. What callers rely on: each gets the
outcome the fold decided for its own command (one `EEXIST` among racing
exclusive creates), a pause of the fold still holds back every change, and
the state stays a pure function of the log: a region that replays the same
log reaches the same digest.
"""

from __future__ import annotations

import errno
import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.harness.kafka import KafkaBroker
from tests.harness.mount import TidefsMount
from tests.test_journal_contract import records_of
from tidefs.fs.coherence import OwnRequests
from tidefs.journal import codec
from tidefs.journal.commands import (
    ROOT_INODE,
    CreateVolume,
    Envelope,
    Mkdir,
    Mknod,
    Noop,
    Outcome,
    Region,
    Rename,
    SetAttr,
    Unlink,
    new_request_id,
)
from tidefs.journal.log import JournalError, JournalUnavailable, open_log
from tidefs.journal.sqlite import SqliteLog
from tidefs.replica.replica import (
    CommandRejected,
    FoldStopped,
    Replica,
    ReplicaError,
    SubmitTimeout,
    fold_range,
)
from tidefs.replica.state import State

REGIONS = (Region("a", "file:///unused-a"), Region("b", "file:///unused-b"))
WAIT_BOUND = 30.0
"""Seconds a bounded wait may take before the test fails (the target is milliseconds)."""


@pytest.fixture
def region_a(
    journal_url: str, journal_volume: str, tmp_path: Path
) -> Iterator[tuple[Replica, OwnRequests]]:
    replica = Replica(open_log(journal_url, journal_volume), State.open(tmp_path / "a"), "a")
    replica.start()
    own = OwnRequests(replica)
    assert own.submit(CreateVolume(name=journal_volume, regions=REGIONS, primary="a")).ok
    yield replica, own
    own.close()
    replica.stop()
    replica.state.close()
    replica.log.close()


# -- the log: append_many --------------------------------------------------------------


def test_append_many_keeps_order_payloads_and_timestamps(
    journal_url: str, journal_volume: str
) -> None:
    with open_log(journal_url, journal_volume) as lg:
        first = lg.append(b"solo")
        entries: list[tuple[bytes, int | None]] = [
            (f"batch-{i}".encode(), 1_700_000_000_000_000_000 + i) for i in range(50)
        ]
        offsets = lg.append_many(entries)
        assert lg.append_many([]) == []
        assert len(offsets) == 50
        assert offsets[0] > first
        assert all(b > a for a, b in itertools.pairwise(offsets))
        by_offset = {r.offset: r for r in records_of(lg)}
        for offset, (payload, ts) in zip(offsets, entries, strict=True):
            assert by_offset[offset].payload == payload
            assert by_offset[offset].timestamp_ns == ts
        assert [r.payload for r in by_offset.values()] == [b"solo"] + [p for p, _ in entries]


def test_append_many_with_a_refused_record_appends_none_of_the_batch(
    journal_url: str, journal_volume: str
) -> None:
    with open_log(journal_url, journal_volume) as lg:
        first = lg.append(b"first")
        bad: list[tuple[bytes, int | None]] = [(b"a", None), ("not bytes", None), (b"c", None)]  # type: ignore[list-item]
        with pytest.raises(TypeError):
            lg.append_many(bad)
        last = lg.append(b"last")
        # A committer that is refused retries nothing: a half-landed batch would stay.
        assert last == first + 1
        assert [r.payload for r in records_of(lg)] == [b"first", b"last"]


@pytest.mark.kafka
def test_kafka_append_many_with_an_oversize_record_appends_none_of_the_batch(
    kafka_broker: KafkaBroker, journal_volume: str
) -> None:
    sep = "&" if "?" in kafka_broker.url else "?"
    with open_log(f"{kafka_broker.url}{sep}max_record_bytes=1000", journal_volume) as lg:
        first = lg.append(b"first")
        with pytest.raises(JournalError, match="exceeds max_record_bytes") as info:
            lg.append_many([(b"a", None), (b"x" * 1001, None), (b"c", None)])
        assert not isinstance(info.value, JournalUnavailable)  # refused: not to be retried
        last = lg.append(b"last")
        assert last == first + 1
        assert [r.payload for r in records_of(lg)] == [b"first", b"last"]


def test_sqlite_append_many_is_one_run_of_offsets_among_concurrent_appends(
    tmp_path: Path,
) -> None:
    lg = SqliteLog(tmp_path / "log.db", "v")
    runs: list[list[int]] = []
    errors: list[BaseException] = []

    def batches(t: int) -> None:
        try:
            for i in range(20):
                runs.append(lg.append_many([(b"m%d-%d-%d" % (t, i, k), None) for k in range(5)]))
        except BaseException as exc:
            errors.append(exc)

    def singles(t: int) -> None:
        try:
            for i in range(40):
                lg.append(b"s%d-%d" % (t, i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=batches, args=(t,)) for t in range(4)]
    threads += [threading.Thread(target=singles, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        # A committer folds its batch itself only if it is one run: never split by others.
        for run in runs:
            assert run == list(range(run[0], run[0] + 5))
        assert lg.head() == 4 * 20 * 5 + 4 * 40
        assert len({r.payload for r in records_of(lg)}) == lg.head()
    finally:
        lg.close()


# -- the committer -------------------------------------------------------------------


def test_threads_racing_through_the_committer_get_the_folds_outcomes(
    region_a: tuple[Replica, OwnRequests], journal_url: str, journal_volume: str, tmp_path: Path
) -> None:
    replica, own = region_a
    top = own.submit(Mkdir(ROOT_INODE, b"top", 0o40755, 0, 0))
    assert top.ok
    results: dict[tuple[int, int], Outcome] = {}
    errors: list[BaseException] = []

    def race(t: int) -> None:
        try:
            for i in range(30):
                # Eight threads race for each name with an exclusive create: one wins.
                results[(t, i)] = own.submit(Mknod(top.inode, b"f%d" % i, 0o100644, 0, 0, 0, True))
        except BaseException as exc:
            errors.append(exc)

    def tidy(t: int) -> None:
        try:
            for (who, i), outcome in sorted(results.items()):
                if who == t and outcome.ok:
                    name = b"f%d" % i
                    if i % 3 == 0:
                        assert own.submit(Unlink(top.inode, name)).ok
                    else:
                        assert own.submit(Rename(top.inode, name, top.inode, name + b".r")).ok
        except BaseException as exc:
            errors.append(exc)

    for step in (race, tidy):
        threads = [threading.Thread(target=step, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        if step is race:
            for i in range(30):
                outcomes = [results[(t, i)] for t in range(8)]
                winners = [o for o in outcomes if o.ok]
                assert len(winners) == 1, i
                assert all(o.errno == errno.EEXIST for o in outcomes if not o.ok)
                assert replica.state.lookup(top.inode, b"f%d" % i) == winners[0].inode
    names = {name for _cookie, name, _ino in replica.state.readdir(top.inode)}
    assert names == {b"f%d.r" % i for i in range(30) if i % 3}
    # Read-your-writes: a winner's file is in the state when its call returned,
    # and the state is the fold of the log: a replay from offset 0 agrees.
    replay = State.open(tmp_path / "replay")
    try:
        applied = replica.barrier(timeout=WAIT_BOUND)
        with open_log(journal_url, journal_volume) as lg:
            assert fold_range(lg, replay, to_offset=applied) == applied
        assert replica.state.applied_offset() == applied
        assert replay.digest() == replica.state.digest()
    finally:
        replay.close()
    assert own.batches < 8 * 30  # some commands shared an append


def test_trio_tasks_are_answered_together_from_one_batch(
    region_a: tuple[Replica, OwnRequests],
) -> None:
    replica, own = region_a
    entered, gate = threading.Event(), threading.Event()
    held: list[Outcome | None] = []

    def ready() -> bool:
        # Holds the committer on this batch until every task below has queued.
        entered.set()
        return gate.wait(WAIT_BOUND)

    before = own.batches
    own.submit_later(Noop("hold"), lambda outcome, _error: held.append(outcome), ready)
    assert entered.wait(WAIT_BOUND)
    outcomes: dict[int, Outcome] = {}

    async def main() -> None:
        async def create(i: int) -> None:
            outcomes[i] = await own.submit_async(Mknod(ROOT_INODE, b"t%d" % i, 0o100644, 0, 0))

        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(create, i)
            await trio.sleep(0)  # every task has queued its command before it waits
            for _ in range(100):
                await trio.sleep(0)
            gate.set()

    trio.run(main)
    assert held and held[0] is not None and held[0].ok
    assert all(outcomes[i].ok for i in range(32))
    for i in range(32):
        assert replica.state.lookup(ROOT_INODE, b"t%d" % i) == outcomes[i].inode
    assert own.batches - before == 2  # the held batch, then all 32 tasks at once


def test_a_paused_fold_holds_back_commands_from_the_committer(
    region_a: tuple[Replica, OwnRequests],
) -> None:
    replica, own = region_a
    applied = replica.state.applied_offset()
    head = replica.log.head()
    replica.pause()
    got: list[Outcome] = []
    worker = threading.Thread(
        target=lambda: got.append(own.submit(Mkdir(ROOT_INODE, b"late", 0o40755, 0, 0)))
    )
    worker.start()
    try:
        deadline = time.monotonic() + WAIT_BOUND
        while replica.log.head() == head and time.monotonic() < deadline:
            time.sleep(0.01)
        assert replica.log.head() > head  # appended...
        assert replica.state.applied_offset() == applied  # ...but not folded while paused
        assert replica.state.lookup(ROOT_INODE, b"late") is None
    finally:
        replica.resume()
        worker.join(WAIT_BOUND)
    assert got and got[0].ok
    assert replica.state.lookup(ROOT_INODE, b"late") == got[0].inode


def test_another_writers_records_are_folded_while_the_committer_is_busy(
    region_a: tuple[Replica, OwnRequests], journal_url: str, journal_volume: str
) -> None:
    """The follower leaves the committer's own batches to it, but never another writer's.

    Region b appends (as its mount would, through its own log client) while
    four threads keep region a's committer appending and folding its own
    batches; each of b's records reaches a's state, and a's own commands all
    get their outcomes.
    """
    replica, own = region_a
    top = own.submit(Mkdir(ROOT_INODE, b"busy", 0o40755, 0, 0))
    assert top.ok
    stop = threading.Event()
    done: list[int] = []
    errors: list[BaseException] = []

    def churn(t: int) -> None:
        try:
            for i in itertools.takewhile(lambda _: not stop.is_set(), range(2_000)):
                name = b"t%d-%d" % (t, i)
                assert own.submit(Mknod(top.inode, name, 0o100644, 0, 0, 0, True)).ok
                assert own.submit(Unlink(top.inode, name)).ok
                done.append(t)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    try:
        with open_log(journal_url, journal_volume) as b:
            for i in range(20):
                while (
                    len(done) < 10 * (i + 1) and not errors and any(t.is_alive() for t in threads)
                ):
                    time.sleep(0.001)  # a's committer is mid-stream
                env = Envelope(
                    command=Mkdir(ROOT_INODE, b"from-b-%d" % i, 0o40755, 0, 0),
                    origin="b",
                    timestamp_ns=time.time_ns(),
                    request_id=new_request_id(),
                )
                offset = b.append(codec.encode(env), env.timestamp_ns)
                assert replica.wait_applied(offset, WAIT_BOUND), f"b's record {offset} not folded"
                assert replica.state.lookup(ROOT_INODE, b"from-b-%d" % i) is not None
        assert any(t.is_alive() for t in threads), "the committer went idle: nothing was tested"
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT_BOUND)
    assert not errors
    assert list(replica.state.readdir(top.inode)) == []


def test_a_journal_refusing_the_committer_does_not_hold_back_others_records(
    tmp_path: Path,
) -> None:
    """While the committer's appends keep failing, what others appended is still folded.

    The committer retries a refused append until its deadline; the follower
    must not leave the log to it all that time. Here another connection
    holds SQLite's write lock, so each of the committer's attempts times out
    (0.3 s) and is retried, while region b's record is already in the log.
    """
    path = tmp_path / "log.db"
    url = f"sqlite://{path}?timeout=0.3"
    replica = Replica(open_log(url, "vol"), State.open(tmp_path / "a"), "a").start()
    own = OwnRequests(replica)
    blocker = sqlite3.connect(path, isolation_level=None)
    submitter: threading.Thread | None = None
    try:
        assert own.submit(CreateVolume(name="vol", regions=REGIONS, primary="a")).ok
        replica.pause()
        with open_log(url, "vol") as b:
            env = Envelope(
                command=Mkdir(ROOT_INODE, b"from-b", 0o40755, 0, 0),
                origin="b",
                timestamp_ns=time.time_ns(),
                request_id=new_request_id(),
            )
            offset = b.append(codec.encode(env), env.timestamp_ns)
        blocker.execute("BEGIN IMMEDIATE")
        got: list[Outcome] = []
        submitter = threading.Thread(
            target=lambda: got.append(own.submit(Mkdir(ROOT_INODE, b"mine", 0o40755, 0, 0)))
        )
        submitter.start()
        deadline = time.monotonic() + WAIT_BOUND
        while replica._own_batches == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # until the committer is in its first attempt
        replica.resume()
        assert replica.wait_applied(offset, WAIT_BOUND / 3), "b's record waited for the committer"
        assert replica.state.lookup(ROOT_INODE, b"from-b") is not None
        assert submitter.is_alive() and not got  # still refused: nothing of its own landed
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        if submitter is not None:
            submitter.join(WAIT_BOUND)
        own.close()
        replica.stop()
        replica.state.close()
        replica.log.close()
    assert got and got[0].ok  # once the lock is free, the retried append lands


def test_commands_after_close_go_straight_to_the_replica(
    region_a: tuple[Replica, OwnRequests],
) -> None:
    replica, own = region_a
    own.close()
    out = own.submit(Mkdir(ROOT_INODE, b"after", 0o40755, 0, 0))
    assert out.ok and replica.state.lookup(ROOT_INODE, b"after") == out.inode
    done: list[tuple[Outcome | None, BaseException | None]] = []
    own.submit_later(Noop("x"), lambda o, e: done.append((o, e)))
    assert done and done[0][0] is not None and done[0][0].ok


def hold_committer(own: OwnRequests) -> threading.Event:
    """Park the committer on a batch of its own; set the returned gate to let it go on.

    Everything queued meanwhile goes into the committer's next batch.
    """
    entered, gate = threading.Event(), threading.Event()

    def ready() -> bool:
        entered.set()
        return gate.wait(WAIT_BOUND)

    own.submit_later(Noop("hold"), lambda _outcome, _error: None, ready)
    assert entered.wait(WAIT_BOUND)
    return gate


def submit_in_thread(
    own: OwnRequests, command: Mkdir | SetAttr, out: dict[str, Outcome | BaseException], key: str
) -> threading.Thread:
    def run() -> None:
        try:
            out[key] = own.submit(command)
        except BaseException as exc:
            out[key] = exc

    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_command_that_cannot_be_logged_fails_alone_in_its_batch(
    region_a: tuple[Replica, OwnRequests],
) -> None:
    replica, own = region_a
    f = own.submit(Mknod(ROOT_INODE, b"f", 0o100644, 0, 0))
    assert f.ok
    attr = replica.state.getattr(f.inode)
    assert attr is not None
    gate = hold_committer(own)
    before = own.batches
    out: dict[str, Outcome | BaseException] = {}
    threads = [
        submit_in_thread(own, Mkdir(ROOT_INODE, b"d1", 0o40755, 0, 0), out, "d1"),
        # Beyond a signed 64-bit long: the log cannot hold it.
        submit_in_thread(own, SetAttr(inode=f.inode, mtime=1 << 63), out, "bad"),
        submit_in_thread(own, Mkdir(ROOT_INODE, b"d2", 0o40755, 0, 0), out, "d2"),
    ]
    deadline = time.monotonic() + WAIT_BOUND
    while len(own._queue) < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(own._queue) == 3  # all three share the next batch
    gate.set()
    for t in threads:
        t.join(WAIT_BOUND)
    assert own.batches - before == 2  # the held batch, then the three together
    assert isinstance(out["bad"], CommandRejected)
    for name in ("d1", "d2"):
        got = out[name]
        assert isinstance(got, Outcome) and got.ok
        assert replica.state.lookup(ROOT_INODE, name.encode()) == got.inode
    assert replica.state.getattr(f.inode) == attr


@pytest.mark.fuse
def test_a_time_the_log_cannot_store_is_eoverflow_and_leaves_the_file(
    tidefs_mount: TidefsMount,
) -> None:
    p = tidefs_mount.path / "f"
    p.write_bytes(b"x")
    os.utime(p, ns=(5 * 10**9, 7 * 10**9))
    for beyond in ((1 << 63) + 10**9, 2**64):
        with pytest.raises(OSError) as info:
            os.utime(p, ns=(beyond, beyond))
        assert info.value.errno == errno.EOVERFLOW
        with pytest.raises(OSError) as info:
            os.utime(p, ns=(6 * 10**9, beyond))
        assert info.value.errno == errno.EOVERFLOW
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (5 * 10**9, 7 * 10**9)
    os.utime(p, ns=(6 * 10**9, 8 * 10**9))  # the mount still serves ordinary times
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (6 * 10**9, 8 * 10**9)


def test_close_returns_only_after_the_committers_last_batch(
    region_a: tuple[Replica, OwnRequests],
) -> None:
    replica, own = region_a
    gate = hold_committer(own)
    out: dict[str, Outcome | BaseException] = {}
    worker = submit_in_thread(own, Mkdir(ROOT_INODE, b"queued", 0o40755, 0, 0), out, "queued")
    deadline = time.monotonic() + WAIT_BOUND
    while len(own._queue) < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    closer = threading.Thread(target=own.close)
    closer.start()
    try:
        # The committer is inside a batch: the mount must not close the state under it.
        closer.join(0.2)
        assert closer.is_alive()
    finally:
        gate.set()
    closer.join(WAIT_BOUND)
    worker.join(WAIT_BOUND)
    assert not closer.is_alive()
    got = out["queued"]
    assert isinstance(got, Outcome) and got.ok  # what was queued was committed
    assert replica.state.lookup(ROOT_INODE, b"queued") == got.inode
    own.close()  # idempotent


def test_a_command_queued_past_its_deadline_fails_without_being_appended(
    region_a: tuple[Replica, OwnRequests],
) -> None:
    replica, _ = region_a
    own = OwnRequests(replica, timeout=0.5)
    try:
        # A batch ahead of it is stuck (as in a journal outage): its own deadline
        # counts from when it was queued, not from when the committer takes it.
        gate = hold_committer(own)
        out: dict[str, Outcome | BaseException] = {}
        worker = submit_in_thread(own, Mkdir(ROOT_INODE, b"late", 0o40755, 0, 0), out, "late")
        deadline = time.monotonic() + WAIT_BOUND
        while len(own._queue) < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        queued_at = time.monotonic()
        head = replica.log.head()
        time.sleep(max(0.0, queued_at + 0.6 - time.monotonic()))  # past its deadline
        gate.set()
        worker.join(WAIT_BOUND)
        assert isinstance(out["late"], SubmitTimeout)
        assert replica.log.head() == head  # never appended: no retry can apply it twice
        assert replica.state.lookup(ROOT_INODE, b"late") is None
        again = own.submit(Mkdir(ROOT_INODE, b"late", 0o40755, 0, 0))  # fresh deadline
        assert again.ok and replica.state.lookup(ROOT_INODE, b"late") == again.inode
    finally:
        own.close()


class _Escaped(BaseException):
    """Escapes every `except Exception` between the committer and its thread."""


def test_a_dead_committer_answers_its_callers_and_later_commands_go_direct(
    region_a: tuple[Replica, OwnRequests], caplog: pytest.LogCaptureFixture
) -> None:
    replica, own = region_a
    entered, gate = threading.Event(), threading.Event()
    held: list[BaseException | None] = []

    def ready() -> bool:
        entered.set()
        gate.wait(WAIT_BOUND)
        raise _Escaped("a bug ends the committer thread")

    own.submit_later(Noop("hold"), lambda _outcome, error: held.append(error), ready)
    assert entered.wait(WAIT_BOUND)
    out: dict[str, Outcome | BaseException] = {}
    worker = submit_in_thread(own, Mkdir(ROOT_INODE, b"queued", 0o40755, 0, 0), out, "queued")
    deadline = time.monotonic() + WAIT_BOUND
    while len(own._queue) < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    with caplog.at_level("CRITICAL", logger="tidefs.fs.coherence"):
        gate.set()
        worker.join(WAIT_BOUND)
        assert not worker.is_alive()  # answered, not left hanging
    assert isinstance(out["queued"], ReplicaError)
    assert held and isinstance(held[0], ReplicaError)
    assert len([r for r in caplog.records if "committer stopped" in r.message]) == 1
    # Later commands take the direct path, and work.
    later = own.submit(Mkdir(ROOT_INODE, b"later", 0o40755, 0, 0))
    assert later.ok and replica.state.lookup(ROOT_INODE, b"later") == later.inode

    async def from_trio() -> Outcome:
        return await own.submit_async(Mkdir(ROOT_INODE, b"trio", 0o40755, 0, 0))

    assert trio.run(from_trio).ok


def test_callers_of_a_failed_batch_each_raise_their_own_error(
    region_a: tuple[Replica, OwnRequests],
) -> None:
    replica, own = region_a
    gate = hold_committer(own)
    out: dict[str, Outcome | BaseException] = {}
    try:
        workers = [
            submit_in_thread(own, Mkdir(ROOT_INODE, b"d%d" % i, 0o40755, 0, 0), out, str(i))
            for i in range(3)
        ]
        deadline = time.monotonic() + WAIT_BOUND
        while len(own._queue) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        # A record no tidefs can decode stops the fold: the whole next batch fails.
        replica.log.append(b"\xffnot a tidefs record")
        while replica.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(replica.error, FoldStopped)
    finally:
        gate.set()
    for t in workers:
        t.join(WAIT_BOUND)
    errors = [out[str(i)] for i in range(3)]
    assert all(isinstance(e, FoldStopped) for e in errors)  # the type the ops layer maps
    assert len({id(e) for e in errors}) == 3
