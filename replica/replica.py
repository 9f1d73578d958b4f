"""A region's replica of a volume: follow the log, fold it, and submit commands.

The replica owns one follower thread. It reads the log from the state's applied
offset, decodes records and folds them in batches (one RocksDB write batch per
batch, invariant 3), then wakes whoever waits for an offset. A writer in the
same region calls `submit`: append the command, wait until this region's fold
has applied that offset, and return the outcome stored under its request id.
That is read-your-writes at the writer, and the reason no metadata server is
needed: the log orders everything, the fold decides.

A mount's committer calls `submit_many` instead: many callers' commands in
one append, and, when they landed right after the applied offset, folded by
the committer's own thread from the payloads it already holds. Only one
thread folds at a time (the fold lock), each record exactly once, in log
order, so the state is the same function of the log whoever folds it.

A record that cannot be decoded (a schema from a newer tidefs, corrupt bytes),
or that enables a feature this tidefs does not know, stops the fold at that
offset without changing state; `submit` and `wait_*`
then raise `FoldStopped` instead of waiting forever.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from tidefs import telemetry
from tidefs.journal import codec, features
from tidefs.journal.commands import Command, Envelope, Outcome, new_request_id
from tidefs.journal.log import JournalUnavailable, Log, Record
from tidefs.replica.state import ApplyResult, State

_T = TypeVar("_T")

log = logging.getLogger(__name__)

Listener = Callable[[ApplyResult], None]


class ReplicaError(Exception):
    """Base of the errors a replica raises to its callers."""


class FoldStopped(ReplicaError):
    """The fold hit a record it cannot apply; the state stays at the offset before it."""


class RegionRemoved(ReplicaError):
    """The region a mount serves was removed from the volume: it takes no more changes."""


class SubmitTimeout(ReplicaError):
    """A command was appended (or may have been) but not applied here in time."""


class CommandRejected(ReplicaError):
    """A command cannot be written to the log (it does not fit the schema); nothing was appended."""


def apply_records(state: State, records: Sequence[Record]) -> ApplyResult:
    """Decode and fold `records` in one batch.

    A record that cannot be decoded, or that enables a schema version or
    feature this tidefs does not know, stops the fold there: everything before it
    is applied, so the state rests at the exact offset before the bad record,
    and the codec error (naming that offset) is raised.
    """
    decoded: list[tuple[int, Envelope]] = []
    error: codec.CodecError | None = None
    for rec in records:
        try:
            env = codec.decode(rec.payload)
            features.check_known(env)
            decoded.append((rec.offset, env))
        except codec.CodecError as exc:
            error = type(exc)(f"record at offset {rec.offset}: {exc}")
            break
    result = state.apply(decoded)
    if error is not None:
        raise error
    return result


def fold_range(
    log_: Log,
    state: State,
    *,
    to_offset: int | None = None,
    batch: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Fold records after the state's applied offset up to `to_offset` (inclusive) or the head.

    Returns the applied offset. `progress(applied, target)` is called after each batch.
    """
    head = log_.head()
    target = head - 1 if to_offset is None else min(to_offset, head - 1)
    applied = state.applied_offset()
    while applied < target:
        records = log_.read(applied + 1, max_records=batch, timeout=1.0)
        records = [r for r in records if r.offset <= target]
        if not records:
            break
        apply_records(state, records)
        applied = state.applied_offset()
        if progress is not None:
            progress(applied, target)
    return applied


class Replica:
    """Follows one volume's log into one region's state, and submits commands for that region."""

    def __init__(
        self,
        log_: Log,
        state: State,
        region: str,
        *,
        batch: int = 1000,
        poll_timeout: float = 0.2,
    ) -> None:
        self.log = log_
        self.state = state
        self.region = region
        self.batch = batch
        self.poll_timeout = poll_timeout
        self._cond = threading.Condition()
        self._fold_lock = threading.Lock()
        """Held while a batch is applied: by the follower, or by `submit_many` folding its own."""
        self._own_batches = 0
        """`submit_many` calls from an append attempt to the fold of their own records (under
        `_cond`): meanwhile the follower waits instead of reading those records back."""
        self._listeners: list[Listener] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._parked = threading.Event()
        self.error: BaseException | None = None
        self.last_record_ns = 0
        self.applied_at_ns = 0
        self.delays = telemetry.DelayWindow()
        """Recent apply delays (writer's timestamp -> applied here), for status reports."""

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Replica:
        """Start the follower thread (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"tidefs-fold-{self.region}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the follower thread; the state keeps its applied offset."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def pause(self, timeout: float = 10.0) -> None:
        """Stop folding until `resume` (tests and chaos use this to create lag).

        Returns once the follower has finished the batch it was folding, so
        that nothing appended after this call is applied before `resume`.
        """
        self._parked.clear()
        self._paused.set()
        if self._thread is not None and self._thread.is_alive():
            self._parked.wait(timeout)
        with self._fold_lock:  # a `submit_many` folding its own batch has finished too
            pass

    def resume(self) -> None:
        """Fold again after `pause`."""
        self._paused.clear()

    def add_listener(self, fn: Listener) -> None:
        """Call `fn(result)` after every applied batch, on the thread that folded it.

        That is the follower thread, or the thread of a `submit_many` folding its
        own appends (a mount's committer), always with the fold lock held and
        one batch at a time. A listener must not block, and must not submit
        or wait for the fold: the fold (and the committer) would wait for it.
        """
        self._listeners.append(fn)

    @property
    def applied(self) -> int:
        """The offset this region has applied (-1 before the first record)."""
        return self.state.applied_offset()

    # -- follower ----------------------------------------------------------

    def _run(self) -> None:
        deferred: float | None = None  # since when this thread has left reads to a committer
        while not self._stop.is_set():
            if self._paused.is_set():
                self._parked.set()
                self._stop.wait(0.05)
                continue
            with self._cond:
                busy = self._own_batches > 0
                if busy and (deferred is None or time.monotonic() - deferred < self.poll_timeout):
                    # A committer is appending records it will fold itself: reading
                    # them back would only race it. Another writer's records show
                    # up as a gap before its next batch, which it leaves to us; and
                    # after `poll_timeout` of deferring (one slow append, or batch
                    # after batch) we read whatever is there anyway.
                    deferred = time.monotonic() if deferred is None else deferred
                    self._cond.wait(self.poll_timeout)
                    continue
            deferred = None
            try:
                self.step(0.0 if busy else self.poll_timeout)
            except codec.CodecError as exc:
                log.error("fold stopped: %s", exc)
                self._fail(FoldStopped(str(exc)))
                return
            except JournalUnavailable as exc:
                log.warning("journal unavailable, retrying: %s", exc)
                self._stop.wait(0.5)
            except Exception as exc:  # an unexpected bug must not hang the waiters
                log.exception("fold failed")
                self._fail(FoldStopped(f"fold failed: {exc!r}"))
                return

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            self.error = exc
            self._cond.notify_all()

    def step(self, timeout: float = 0.0) -> int:
        """Fold one batch of available records; return how many were applied."""
        start = self.state.applied_offset() + 1
        records = self.log.read(start, max_records=self.batch, timeout=timeout)
        if not records:
            return 0
        with self._fold_lock:
            # `submit_many` may have folded some of them while this thread read.
            applied = self.state.applied_offset()
            records = [r for r in records if r.offset > applied]
            if not records:
                return 0
            self._apply(records)
        return len(records)

    def _apply(self, records: Sequence[Record]) -> None:
        """Fold `records` (fold lock held), tell the listeners, and wake the waiters."""
        result = apply_records(self.state, records)
        self.last_record_ns = records[-1].timestamp_ns
        self.applied_at_ns = time.time_ns()
        telemetry.record_apply([r.timestamp_ns for r in records], self.delays)
        for fn in self._listeners:
            try:
                fn(result)
            except Exception:
                log.exception("apply listener failed")
        with self._cond:
            self._cond.notify_all()

    # -- waiting -----------------------------------------------------------

    def wait_applied(self, offset: int, timeout: float | None = None) -> bool:
        """Wait until this region has applied `offset`; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.state.applied_offset() < offset:
                if self.error is not None:
                    raise FoldStopped(str(self.error))
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if self._thread is None:
                    # No follower: fold on the caller's thread.
                    self._cond.release()
                    try:
                        self.step(min(remaining or 0.2, 0.2))
                    finally:
                        self._cond.acquire()
                else:
                    self._cond.wait(0.2 if remaining is None else min(remaining, 0.2))
        return True

    def barrier(self, timeout: float | None = None) -> int:
        """Wait until everything appended before this call is applied here; return that offset."""
        target = self.log.head() - 1
        if not self.wait_applied(target, timeout):
            raise SubmitTimeout(f"region {self.region} did not reach offset {target} in time")
        return target

    # -- writing -----------------------------------------------------------

    def submit_many(
        self,
        commands: Sequence[tuple[Command, bytes]],
        *,
        timeout: float = 60.0,
    ) -> list[Outcome | CommandRejected]:
        """Submit `(command, request id)` pairs as one append; return their outcomes in order.

        This is `submit` for a committer that gathered the commands of many
        callers: one durable write (`Log.append_many`) and one fold for all
        of them. When the records landed right after the applied offset, this
        thread folds them itself from the payloads it holds, exactly as the
        follower would have from the log (same records, same order, same
        batch rules), and the follower finds them applied; otherwise (another
        writer's records came first, or the fold is paused) it waits for the
        follower as `submit` does.

        A command that cannot be encoded is not appended and gets a
        `CommandRejected` in its place; the others are appended without it.
        """
        if self.error is not None:
            raise FoldStopped(str(self.error))
        now = time.time_ns()
        results: list[Outcome | CommandRejected | None] = [None] * len(commands)
        envs: list[tuple[int, Envelope]] = []
        entries: list[tuple[bytes, int | None]] = []
        enabled = self.state.features()
        for i, (cmd, rid) in enumerate(commands):
            env = Envelope(command=cmd, origin=self.region, timestamp_ns=now, request_id=rid)
            try:
                entries.append((self._encode(env, enabled), now))
            except (codec.CodecError, CommandRejected) as exc:
                results[i] = CommandRejected(f"{type(cmd).__name__} cannot be logged: {exc}")
                continue
            envs.append((i, env))
        if not entries:
            return [r for r in results if r is not None]
        deadline = time.monotonic() + timeout
        # One span and one `append_duration` sample per batch, not per command: a
        # committer's callers share them. The span names the commands' type if
        # they all have one (a batch of one command), else "batch".
        kinds = {type(env.command).__name__ for _, env in envs}
        with telemetry.tracer.start_as_current_span(
            telemetry.SPAN_SUBMIT,
            attributes={
                telemetry.ATTR_COMMAND: kinds.pop() if len(kinds) == 1 else "batch",
                **telemetry.attrs(),
            },
        ) as span:
            offsets = self._append(lambda: self._append_own(entries), deadline)
            try:
                span.set_attribute(telemetry.ATTR_OFFSET, offsets[-1])
                records = [
                    Record(offset, now, payload)
                    for offset, (payload, _) in zip(offsets, entries, strict=True)
                ]
                self._fold_own(records)
            finally:
                self._end_own()
            if not self.wait_applied(offsets[-1], max(0.0, deadline - time.monotonic())):
                raise SubmitTimeout(
                    f"command at offset {offsets[-1]} not applied by region {self.region} "
                    f"in {timeout}s"
                )
        for (i, env), offset in zip(envs, offsets, strict=True):
            outcome = self.state.outcome(env.request_id)
            if outcome is None:  # pragma: no cover - the fold records every outcome
                raise ReplicaError(f"no outcome recorded for the command at offset {offset}")
            results[i] = outcome
        return [r for r in results if r is not None]

    def _encode(self, env: Envelope, enabled: features.Enabled) -> bytes:
        """Encode `env` with the schema version the volume enabled, so every region reads it.

        Raises CommandRejected when the command uses a feature the volume has
        not enabled, and CodecError when it does not fit the schema.
        """
        feature = features.missing(env.command, enabled)
        if feature is not None:
            vol = self.state.volume()
            raise CommandRejected(features.not_enabled(feature, vol.name if vol else "VOLUME"))
        return codec.encode(env, features.write_version(env.command, enabled))

    def _append_own(self, entries: Sequence[tuple[bytes, int | None]]) -> list[int]:
        """One attempt to append a batch that this thread folds itself (`_fold_own`).

        The follower waits from here until `_end_own`, which a failed attempt
        calls at once: a journal refusing appends must not hold back the fold
        of what others already appended.
        """
        with self._cond:
            self._own_batches += 1
        try:
            return self.log.append_many(entries)
        except BaseException:
            self._end_own()
            raise

    def _end_own(self) -> None:
        with self._cond:
            self._own_batches -= 1
            self._cond.notify_all()

    def _fold_own(self, records: Sequence[Record]) -> None:
        """Fold records just appended here if they directly follow the applied offset."""
        if any(b.offset != a.offset + 1 for a, b in itertools.pairwise(records)):
            return  # other records landed between them: the follower folds them all
        with self._fold_lock:
            if self._paused.is_set() or self.error is not None:
                return
            if self.state.applied_offset() != records[0].offset - 1:
                return  # the follower is behind (it folds ours next) or already past them
            for i in range(0, len(records), self.batch):
                try:
                    self._apply(records[i : i + self.batch])
                except Exception as exc:  # as the follower would: stop, never guess
                    log.exception("fold of appended records failed")
                    self._fail(FoldStopped(f"fold failed: {exc!r}"))
                    raise FoldStopped(str(exc)) from exc

    @staticmethod
    def _append(append: Callable[[], _T], deadline: float) -> _T:
        """Run `append` until it succeeds or `deadline` passes, timing each attempt.

        An append that failed with JournalUnavailable may still have landed,
        so it is retried as it was, with the same request ids: the fold
        applies each command once.
        """
        while True:
            started = time.perf_counter()
            try:
                return append()
            except JournalUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
            finally:
                telemetry.append_duration.record(time.perf_counter() - started, telemetry.attrs())

    def submit(
        self,
        command: Command,
        *,
        request_id: bytes | None = None,
        timestamp_ns: int | None = None,
        timeout: float = 60.0,
    ) -> Outcome:
        """Append `command`, wait for this region to fold it, and return its outcome.

        An append that fails with JournalUnavailable may still have landed, so
        it is retried with the same request id: the fold applies it once.
        """
        if self.error is not None:
            raise FoldStopped(str(self.error))
        env = Envelope(
            command=command,
            origin=self.region,
            timestamp_ns=time.time_ns() if timestamp_ns is None else timestamp_ns,
            request_id=request_id or new_request_id(),
        )
        payload = self._encode(env, self.state.features())
        deadline = time.monotonic() + timeout
        with telemetry.tracer.start_as_current_span(
            telemetry.SPAN_SUBMIT,
            attributes={telemetry.ATTR_COMMAND: type(command).__name__, **telemetry.attrs()},
        ) as span:
            offset = self._append(lambda: self.log.append(payload, env.timestamp_ns), deadline)
            span.set_attribute(telemetry.ATTR_OFFSET, offset)
            if not self.wait_applied(offset, max(0.0, deadline - time.monotonic())):
                raise SubmitTimeout(
                    f"command at offset {offset} not applied by region {self.region} in {timeout}s"
                )
        outcome = self.state.outcome(env.request_id)
        if outcome is None:  # pragma: no cover - the fold records every outcome
            raise ReplicaError(f"no outcome recorded for the command at offset {offset}")
        return outcome
