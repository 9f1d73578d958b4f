"""A replicator whose volume has no other region: caught up without waiting for the fold.

While the volume has only this region the replicator follows the state's
applied offset instead of reading the log. `wait_idle`, `run_once` and
`tidefs replicate --once` must still return once the log is read to its head
at the call, as they did when the replicator always read the log, even when
the fold is paused (or stopped) behind it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tidefs.journal import codec
from tidefs.journal.commands import (
    ROOT_INODE,
    CreateVolume,
    Envelope,
    Mknod,
    Region,
    new_request_id,
)
from tidefs.journal.log import open_log
from tidefs.replica.replica import Replica
from tidefs.replica.replicator import Replicator
from tidefs.replica.state import State
from tidefs.replica.store import open_store

WAIT_BOUND = 30.0
"""Seconds a bounded wait may take before the test fails (the target is milliseconds)."""


@pytest.fixture
def lone_region(journal_url: str, journal_volume: str, tmp_path: Path) -> Iterator[Replica]:
    url = f"file://{tmp_path / 'blocks-a'}"
    replica = Replica(open_log(journal_url, journal_volume), State.open(tmp_path / "a"), "a")
    replica.start()
    create = CreateVolume(name=journal_volume, regions=(Region("a", url),), primary="a")
    assert replica.submit(create).ok
    yield replica
    replica.stop()
    replica.state.close()
    replica.log.close()


def append_unfolded(replica: Replica, n: int) -> int:
    """Append `n` creates straight to the log (nobody waits for the fold); return the last offset."""
    last = -1
    for i in range(n):
        env = Envelope(
            command=Mknod(ROOT_INODE, b"f%d" % i, 0o100644, 0, 0),
            origin="a",
            timestamp_ns=1_700_000_000_000_000_000,
            request_id=new_request_id(),
        )
        last = replica.log.append(codec.encode(env))
    return last


@pytest.mark.parametrize("threaded", [False, True], ids=["caller", "thread"])
def test_a_lone_region_is_caught_up_while_its_fold_is_paused(
    lone_region: Replica, journal_url: str, journal_volume: str, tmp_path: Path, threaded: bool
) -> None:
    replica = lone_region
    store = open_store(f"file://{tmp_path / 'blocks-a'}")
    log_ = open_log(journal_url, journal_volume)
    repl = Replicator(log_, "a", {"a": store}, tmp_path / "progress", state=replica.state)
    try:
        if threaded:
            repl.start()
        assert repl.wait_idle(timeout=WAIT_BOUND)
        replica.pause()
        try:
            last = append_unfolded(replica, 5)
            assert replica.state.applied_offset() < last  # the fold really is behind
            assert repl.wait_idle(timeout=WAIT_BOUND)
            if not threaded:
                assert repl.run_once(timeout=WAIT_BOUND) == 0  # nothing to copy, and returns
            assert repl.stats().log_position >= last
            assert replica.state.applied_offset() < last
        finally:
            replica.resume()
        replica.barrier(timeout=WAIT_BOUND)
        # Once the fold has caught up, the replicator follows it again.
        assert repl.wait_idle(timeout=WAIT_BOUND)
    finally:
        repl.close()
        log_.close()
        store.close()
