"""Concurrent requests reuse the mount's request-reading tasks instead of starting new ones.

pyfuse3 reads FUSE requests in trio tasks: when none is left reading it
starts one, and it ends a task as soon as more idle ones are left than it
was asked to keep. Kept at one, eight threads creating files made the mount
start and end a task (with a fresh request buffer) for every file or so.
The proof is pyfuse3's own debug log of the tasks it starts.
"""

from __future__ import annotations

import os
import threading

import pytest

from tests.harness.mount import MountFactory
from tidefs.fs.mount import FUSE_READERS

pytestmark = pytest.mark.fuse

THREADS = 8
FILES = 400


def test_eight_threads_start_few_request_tasks(mount_factory: MountFactory) -> None:
    m = mount_factory(extra=["-v"])  # pyfuse3 logs every task it starts at debug level
    dirs = [m.path / f"t{t}" for t in range(THREADS)]
    for d in dirs:
        d.mkdir()
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(t, FILES, THREADS):
                p = dirs[t] / f"f{i}"
                os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
                os.stat(p)
                os.unlink(p)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors[0]
    started = m.log_path.read_text(errors="replace").count("starting another worker")
    # At most one start per task kept, plus a few beyond them under a burst.
    assert started <= FUSE_READERS + THREADS, f"{started} tasks started for {FILES} files"
