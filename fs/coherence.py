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
the time of the write to the time of the commit). Any other batch
invalidates everything it changed: dropping an entry the kernel could have
kept costs one lookup, keeping a stale one shows another region's file as it
was.

Notifications go out from a thread of their own: `invalidate_entry` blocks
while the kernel runs a related request (a mkdir in the same directory,
itself waiting for the fold), so the fold's thread only queues.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyfuse3

from tidefs.journal.commands import (
    Command,
    CommitSlice,
    CompactChunk,
    Envelope,
    Outcome,
    new_request_id,
)

if TYPE_CHECKING:
    from tidefs.replica.replica import Replica
    from tidefs.replica.state import ApplyResult, State

log = logging.getLogger(__name__)


class OwnRequests:
    """Submits commands under request ids it remembers until they are applied; thread-safe."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._lock = threading.Lock()
        self._ids: set[bytes] = set()

    def submit(self, command: Command, request_id: bytes | None = None) -> Outcome:
        """Submit through the replica, with the request id marked as this mount's."""
        rid = request_id or new_request_id()
        with self._lock:
            self._ids.add(rid)
        try:
            return self.replica.submit(command, request_id=rid)
        finally:
            with self._lock:
                self._ids.discard(rid)

    def all_mine(self, request_ids: Sequence[bytes]) -> bool:
        with self._lock:
            return all(rid in self._ids for rid in request_ids)


class ObservedState:
    """The state as the replica's follower sees it: it remembers the last batch applied.

    Only the follower thread applies, and it calls the listeners right after
    `apply`, so `last_batch` is the batch a listener is told about.
    """

    def __init__(self, state: State) -> None:
        self._state = state
        self.last_batch: Sequence[tuple[int, Envelope]] = ()

    def apply(self, batch: Sequence[tuple[int, Envelope]]) -> ApplyResult:
        self.last_batch = batch
        return self._state.apply(batch)

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
        """Replica listener (follower thread): queue what to invalidate; never blocks."""
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
