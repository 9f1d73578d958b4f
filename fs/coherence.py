"""Keeping the kernel's caches true to the log, without throwing away what is still true.

The kernel caches attributes, directory entries and file pages of a mount
(`keep_cache`, attribute and entry timeouts). Changes this mount makes reach
those caches through the replies to its own requests; changes that arrive in
the log from anywhere else — another region, another mount of this region —
must be pushed out with `invalidate_inode` / `invalidate_entry`.

The fold tells the replica's listeners what each applied batch changed, but
not who wrote it. So the mount submits every command under a request id it
registers (`OwnRequests`), and the replica folds through `ObservedState`,
which notes the request ids of the batch it applies. A batch made only of
this mount's commands needs no invalidation, except of the attributes of
files whose data it committed (a flush behind the writer moves mtime from
the time of the write to the time of the commit), and of the pages of files
it appended to (an O_APPEND write lands where the fold puts it, which may be
past where the kernel wrote it into its cache). Any other batch
invalidates everything it changed: dropping an entry the kernel could have
kept costs one lookup, keeping a stale one shows another region's file as it
was.

The same place hears of every fold of the mount before it happens, which is
what a file removed elsewhere while open here needs: the fold drops the
inode (it cannot know about this mount's handles, and must decide the same
everywhere), so `ObservedState` cuts a batch just before each `Reclaim` of
an inode held open here and lets the data path keep what those handles
still read (see fs/data.py). After every batch it tells the data path which
inodes changed, so that cached allocated sizes are forgotten.

Notifications go out from a thread of their own: `invalidate_entry` blocks
while the kernel runs a related request (a mkdir in the same directory,
itself waiting for the fold), so the fold's thread only queues.

`OwnRequests` is also the mount's committer, because every command of the
mount passes through it anyway: callers queue commands, and one thread
appends whatever is queued as one batch, folds it and answers every caller.
Per command, a trip through a worker thread, a group commit, the follower's
read-back and a wake-up of trio each cost more CPU than the command's own
encoding and fold; per batch they are paid once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import pyfuse3
import trio

from tidefs.journal.commands import (
    Command,
    CommitSlice,
    CompactChunk,
    Envelope,
    Outcome,
    Reclaim,
    new_request_id,
)
from tidefs.replica.replica import RegionRemoved, ReplicaError, SubmitTimeout

if TYPE_CHECKING:
    from tidefs.replica.replica import Replica
    from tidefs.replica.state import ApplyResult, State

log = logging.getLogger(__name__)


LAZY_DELAY_S = 0.05
"""Longest wait of a command nobody waits for (a Reclaim) for a batch to join.

Removing a file queues its Reclaim behind the unlink; alone, it would cost a
batch (an append, a fold, the follower's wake-up) of its own per file."""


class _Request:
    """One command waiting in the committer's queue, and how to tell its caller the outcome."""

    __slots__ = (
        "command",
        "deadline",
        "done",
        "error",
        "finished",
        "lazy",
        "outcome",
        "ready",
        "request_id",
        "task",
        "token",
    )

    def __init__(self, command: Command, request_id: bytes, deadline: float) -> None:
        self.command = command
        self.request_id = request_id
        self.deadline = deadline
        """`time.monotonic()` by which it must be applied; set when it is queued."""
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self.ready: Callable[[], bool] | None = None
        """Asked just before the append: False drops the command (outcome stays None)."""
        self.done: Callable[[_Request], None] | None = None
        """Called on the committer thread once the outcome (or error) is known."""
        self.task: trio.lowlevel.Task | None = None
        """The trio task parked until the outcome is known (`submit_async`)."""
        self.token: trio.lowlevel.TrioToken | None = None
        self.lazy = False
        """Nobody waits for it: it rides with the next batch, or goes after LAZY_DELAY_S."""
        self.finished = False
        """Its caller has been told (or is being woken): never tell it twice."""


class OwnRequests:
    """Submits this mount's commands under request ids it remembers until they are applied.

    It is the mount's committer: callers queue commands, and one thread
    takes everything queued, appends it as one batch (one transaction, one
    fsync), folds it (`Replica.submit_many`) and hands each caller its
    outcome. With many calls in flight the append, the fold and the
    wake-ups are paid once per batch, not once per command. A call from the
    trio thread (`submit_async`) queues without a worker thread of its own,
    and the callers of one trio run are woken together by one
    `run_sync_soon`. Thread-safe.
    """

    def __init__(self, replica: Replica, *, max_batch: int = 256, timeout: float = 60.0) -> None:
        self.replica = replica
        self.max_batch = max_batch
        self.timeout = timeout
        """Seconds from queueing a command until its caller gets SubmitTimeout, however
        many batches it waits behind (a journal outage); an expired command is not appended."""
        self._lock = threading.Lock()
        self._ids: set[bytes] = set()
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._waited_for = 0
        """How many queued requests have a caller waiting (not lazy)."""
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0
        """How many batches the committer appended (fewer than commands when it batched)."""
        self.removed: RegionRemoved | None = None
        """Set once the fold removed this mount's region: every later command is refused."""

    def submit(self, command: Command, request_id: bytes | None = None) -> Outcome:
        """Submit and wait for the outcome (any thread but the trio thread)."""
        if self.removed is not None:
            raise self.removed
        req = _Request(command, request_id or new_request_id(), time.monotonic() + self.timeout)
        finished = threading.Event()
        req.done = lambda _req: finished.set()
        if not self._enqueue(req):
            return self._submit_direct(req)
        finished.wait()
        return self._result(req)

    async def submit_async(self, command: Command, request_id: bytes | None = None) -> Outcome:
        """Submit from the trio thread and wait for the outcome without a worker thread."""
        if self.removed is not None:
            raise self.removed
        req = _Request(command, request_id or new_request_id(), time.monotonic() + self.timeout)
        req.task = trio.lowlevel.current_task()
        req.token = trio.lowlevel.current_trio_token()
        if not self._enqueue(req):
            return await trio.to_thread.run_sync(self._submit_direct, req)
        # Parked with no checkpoint since the enqueue, so the committer's wake-up
        # (run on this thread) finds it parked. The command is on its way: a
        # cancellation does not end the wait (a shield, without a cancel scope's cost).
        await trio.lowlevel.wait_task_rescheduled(_no_abort)
        return self._result(req)

    def submit_later(
        self,
        command: Command,
        done: Callable[[Outcome | None, BaseException | None], None],
        ready: Callable[[], bool] | None = None,
    ) -> None:
        """Queue a command nobody waits for; `done(outcome, error)` runs on the committer thread.

        `ready()` is asked just before the append; if it says False the command is
        dropped and `done(None, None)` is called. The command does not start a
        batch of its own: it joins the next one, or goes after `LAZY_DELAY_S`.
        """
        if self.removed is not None:
            done(None, self.removed)
            return
        req = _Request(command, new_request_id(), time.monotonic() + self.timeout)
        req.lazy = True
        req.ready = ready
        req.done = lambda r: done(r.outcome, r.error)
        if not self._enqueue(req):
            if ready is None or ready():
                with contextlib.suppress(Exception):  # reported through done()
                    self._submit_direct(req)
            done(req.outcome, req.error)

    def all_mine(self, request_ids: Sequence[bytes]) -> bool:
        with self._lock:
            return all(rid in self._ids for rid in request_ids)

    def close(self) -> None:
        """Commit what is queued, then stop the committer; later calls submit directly.

        Returns only once the committer thread has ended, so that the replica's
        state can be closed after it: the thread may be folding. Each batch is
        bounded (a request fails once its deadline passes), so this is too.
        Idempotent.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the committer ---------------------------------------------------------------

    def _enqueue(self, req: _Request) -> bool:
        """Queue `req` for the committer (starting it on first use); False once closed."""
        with self._cond:
            if self._closed:
                return False
            self._queue.append(req)
            if not req.lazy:
                self._waited_for += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tidefs-committer", daemon=True
                )
                self._thread.start()
            elif len(self._queue) == 1 or (self._waited_for == 1 and not req.lazy):
                self._cond.notify()  # an idle committer starts waiting (lazy) or committing
        return True

    def _run(self) -> None:
        batch: list[_Request] = []
        try:
            self._loop(batch)
        except BaseException as exc:  # never leave callers waiting for a dead thread
            self._die(batch, exc)

    def _loop(self, batch: list[_Request]) -> None:
        """Commit batches until closed; `batch` holds the one being committed."""
        while True:
            with self._cond:
                while not self._waited_for and not self._closed:
                    if not self._queue:
                        self._cond.wait()
                    elif not self._cond.wait(LAZY_DELAY_S):
                        break  # only lazy commands, and they have waited long enough
                if not self._queue:
                    return
                batch[:] = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                self._waited_for -= sum(1 for req in batch if not req.lazy)
            self._commit(batch)
            batch.clear()

    def _die(self, batch: list[_Request], exc: BaseException) -> None:
        """The committer thread is ending on an error: answer everyone, submit directly from now."""
        log.critical(
            "the metadata committer stopped; commands go straight to the replica from now on",
            exc_info=exc,
        )
        with self._cond:
            self._closed = True  # `_enqueue` refuses: callers take the direct path
            queued, self._queue = self._queue, []
            self._waited_for = 0
        error = ReplicaError(f"the mount's committer stopped: {exc!r}")
        unanswered = [req for req in [*batch, *queued] if not req.finished]
        for req in unanswered:
            if req.outcome is None and req.error is None:
                req.error = error
        _finish(unanswered)

    def _commit(self, batch: list[_Request]) -> None:
        """Append, fold and answer one batch (committer thread); raises no Exception."""
        todo = [req for req in batch if req.ready is None or _ready(req)]
        now = time.monotonic()
        for req in todo:
            if req.deadline <= now:
                req.error = SubmitTimeout(
                    f"{type(req.command).__name__} not appended: it waited "
                    f"{self.timeout:g}s for the committer"
                )
        todo = [req for req in todo if req.error is None]
        with self._lock:
            self._ids.update(req.request_id for req in todo)
        try:
            results = self.replica.submit_many(
                [(r.command, r.request_id) for r in todo],
                timeout=min((r.deadline for r in todo), default=now) - now,
            )
            for req, result in zip(todo, results, strict=True):
                if isinstance(result, Outcome):
                    req.outcome = result
                else:  # this command alone cannot be logged; the others were
                    req.error = result
        except Exception as exc:
            for req in todo:
                req.error = exc
        finally:
            with self._lock:
                self._ids.difference_update(req.request_id for req in todo)
        self.batches += 1
        _finish(batch)

    def _submit_direct(self, req: _Request) -> Outcome:
        """Submit one command on the caller's thread (after close)."""
        with self._lock:
            self._ids.add(req.request_id)
        try:
            req.outcome = self.replica.submit(req.command, request_id=req.request_id)
            return req.outcome
        except Exception as exc:
            req.error = exc
            raise
        finally:
            with self._lock:
                self._ids.discard(req.request_id)

    @staticmethod
    def _result(req: _Request) -> Outcome:
        if req.error is not None:
            # The callers of a failed batch share its error: each raises a fresh one
            # of the same type (raising one object in many threads grows its traceback).
            raise _fresh(req.error) from req.error
        assert req.outcome is not None  # only submit_later's commands may be dropped
        return req.outcome


def _fresh(exc: BaseException) -> BaseException:
    """A new exception of the type of `exc` (the caller maps the type), without its traceback."""
    try:
        return copy.copy(exc)
    except Exception:  # a type that cannot be rebuilt from its args
        return ReplicaError(str(exc))


def _ready(req: _Request) -> bool:
    assert req.ready is not None
    try:
        return req.ready()
    except Exception:
        log.exception("readiness check of %s failed", type(req.command).__name__)
        return False


def _finish(batch: Sequence[_Request]) -> None:
    """Tell every caller of `batch` its outcome: trio callers with one call per trio run."""
    by_token: dict[trio.lowlevel.TrioToken, list[trio.lowlevel.Task]] = {}
    for req in batch:
        req.finished = True
        if req.token is not None and req.task is not None:
            by_token.setdefault(req.token, []).append(req.task)
        elif req.done is not None:
            try:
                req.done(req)
            except Exception:
                log.exception("completion of %s failed", type(req.command).__name__)
    for token, tasks in by_token.items():
        # RunFinishedError: the mount's loop is gone, nobody waits any more.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(_wake_all, tasks)


def _wake_all(tasks: Sequence[trio.lowlevel.Task]) -> None:
    for task in tasks:
        trio.lowlevel.reschedule(task)


def _no_abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


class Keeper(Protocol):
    """What the data path needs to hear of the folds (fs/data.py, `DataPath`)."""

    def holds(self, ino: int) -> bool:
        """Whether a handle of this mount has `ino` open."""
        ...

    def keep(self, ino: int) -> None:
        """Snapshot what the open handles of `ino` read, before the fold drops it."""
        ...

    def changed(self, inodes: frozenset[int]) -> None:
        """The fold changed these inodes."""
        ...


class ObservedState:
    """The state as the replica's folds see it: it remembers the last batch applied.

    A batch is applied by the follower thread or by the committer thread
    folding its own appends (`Replica.submit_many`), one at a time under the
    replica's fold lock, and whichever applies calls the listeners right
    after `apply`, still holding that lock: so `last_batch` is the batch a
    listener is told about.

    With a `keeper`, a batch that reclaims an inode the keeper holds open is
    applied in parts, cut just before each such `Reclaim`, and the keeper
    keeps the inode as the state has it then (module doc). The fold and the
    state it leaves are the same as in one part.
    """

    def __init__(self, state: State, keeper: Keeper | None = None) -> None:
        self._state = state
        self.keeper = keeper
        self.last_batch: Sequence[tuple[int, Envelope]] = ()

    def apply(self, batch: Sequence[tuple[int, Envelope]]) -> ApplyResult:
        self.last_batch = batch
        keeper = self.keeper
        if keeper is None:
            return self._state.apply(batch)
        cuts = [
            i
            for i, (_offset, env) in enumerate(batch)
            if isinstance(env.command, Reclaim) and keeper.holds(env.command.inode)
        ]
        result = self._apply_cut(batch, cuts, keeper) if cuts else self._state.apply(batch)
        keeper.changed(result.changed_inodes)
        return result

    def _apply_cut(
        self, batch: Sequence[tuple[int, Envelope]], cuts: list[int], keeper: Keeper
    ) -> ApplyResult:
        """Apply `batch` in parts, keeping each reclaimed inode just before its Reclaim."""
        parts: list[ApplyResult] = []
        start = 0
        for cut in cuts:
            if cut > start:
                parts.append(self._state.apply(batch[start:cut]))
            start = cut
            command = batch[cut][1].command
            assert isinstance(command, Reclaim)
            keeper.keep(command.inode)
        parts.append(self._state.apply(batch[start:]))
        return replace(
            parts[-1],
            outcomes=[o for p in parts for o in p.outcomes],
            changed_inodes=frozenset().union(*(p.changed_inodes for p in parts)),
            changed_entries=frozenset().union(*(p.changed_entries for p in parts)),
            skipped=sum(p.skipped for p in parts),
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


Notice = tuple[frozenset[int], frozenset[tuple[int, bytes]], bool]
"""(inodes, entries, attributes only) to invalidate."""


class Invalidator:
    """Tell the kernel what other writers changed, from a thread of its own."""

    def __init__(self, observed: ObservedState, own: OwnRequests) -> None:
        self.observed = observed
        self.own = own
        self._queue: queue.SimpleQueue[Notice | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._active = False
        self.sent = 0

    def on_apply(self, result: ApplyResult) -> None:
        """Replica listener (on the folding thread): queue what to invalidate; never blocks."""
        if not self._active or not (result.changed_inodes or result.changed_entries):
            return
        batch = self.observed.last_batch
        if batch and self.own.all_mine([env.request_id for _, env in batch]):
            data = frozenset(
                env.command.inode
                for _, env in batch
                if isinstance(env.command, CommitSlice | CompactChunk)
            )
            if data:
                self._queue.put((data, frozenset(), True))
            moved = frozenset(
                env.command.inode
                for _, env in batch
                if isinstance(env.command, CommitSlice) and env.command.append
            )
            if moved:
                # The kernel cached an append's bytes where it believed the end was;
                # the fold may have put them further on, behind another region's.
                self._queue.put((moved, frozenset(), False))
            return
        self._queue.put((result.changed_inodes, result.changed_entries, False))

    def start(self) -> None:
        """Start notifying; call once the kernel mount exists."""
        self._active = True
        self._thread = threading.Thread(target=self._run, name="tidefs-invalidate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop before the FUSE session closes: a notification after that would crash."""
        self._active = False
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or not self._active:
                return
            inodes, entries, attr_only = item
            for parent, name in entries:
                if not self._active:
                    return
                with contextlib.suppress(OSError):  # ENOENT: the kernel never saw it
                    pyfuse3.invalidate_entry(parent, name)
                    self.sent += 1
            for ino in inodes:
                if not self._active:
                    return
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_inode(ino, attr_only)
                    self.sent += 1
