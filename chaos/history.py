"""The workload of a chaos run and its history: every operation as ok, failed or unknown.

Jepsen's rule: a client that did not hear back does not know whether its
operation happened, so it records "unknown", never "failed". The checker then
accepts either outcome for unknown operations and exactly one for the others.

Values are unique and traceable. Every file content is generated from the id
of the operation that wrote it (`value(op_id)`): its first line names the
operation, the rest is filler derived from that id. A read therefore tells
exactly which write it saw, a lost write is a missing id, a duplicate is an
id found twice, and any other bytes are wrong bytes.

Each region runs one writer and one reader on its own mount:
- the writer works in its own directory (`w-<region>`), so that its
  operations are sequential and the expected final tree follows from its
  history alone. A file is always written whole to a temporary name
  (`tmp-<region>/`), fsynced, closed, then renamed into place, as data
  pipelines publish files: a reader never meets a half-written file, and the
  rename is the acknowledgement;
- the reader reads random published paths of every region and checks the bytes
  against what could be there (`Lineage`);
- the appender adds lines to one file shared by every region (`APPEND_LOG`),
  each an open(O_APPEND), one write and a close, as loggers do: every
  acknowledged line must end up in that file exactly once, in the same order
  in every region, each region's lines in the order it wrote them.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

OK = "ok"
FAIL = "fail"
UNKNOWN = "unknown"

APPEND_LOG = "appends.log"
"""The file every region's appender appends its lines to."""

DEFINITE_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR})
"""Errors that mean the file system decided and did nothing: the operation failed."""


def value(op_id: str) -> bytes:
    """Return the unique content written by operation `op_id`."""
    seed = hashlib.sha256(op_id.encode()).digest()
    size = 64 + int.from_bytes(seed[:4], "big") % (96 << 10)  # up to 96 KiB: one or two blocks
    head = f"tidefs-chaos {op_id}\n".encode()
    body = hashlib.shake_256(seed).digest(max(0, size - len(head)))
    return head + body


def append_line(op_id: str) -> bytes:
    """Return the line appended by operation `op_id`."""
    return f"append {op_id}\n".encode()


def op_id_of(data: bytes) -> str | None:
    """Return the operation id whose value `data` is exactly, or None for any other bytes."""
    if not data.startswith(b"tidefs-chaos "):
        return None
    line, _, _ = data.partition(b"\n")
    op_id = line[len(b"tidefs-chaos ") :].decode(errors="replace")
    return op_id if value(op_id) == data else None


@dataclass
class Op:
    """One operation of the history."""

    op_id: str
    region: str
    kind: str  # put, rename, unlink, read, append
    path: str
    target: str = ""  # rename destination
    status: str = UNKNOWN  # until the call returns
    error: str = ""
    seen: str | None = None  # read: the op id read, "" for absent
    start: float = 0.0
    end: float = 0.0


@dataclass
class History:
    """All operations of a run, in invocation order; thread-safe."""

    ops: list[Op] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def invoke(self, op: Op) -> Op:
        op.start = time.monotonic()
        with self.lock:
            self.ops.append(op)
        return op

    def writes(self, region: str | None = None) -> list[Op]:
        return [o for o in self.ops if o.kind != "read" and region in (None, o.region)]

    def reads(self) -> list[Op]:
        return [o for o in self.ops if o.kind == "read"]


class Lineage:
    """For each path, every value that could ever be there (written or moved there).

    Updated when an operation is invoked, before the call, so that a reader
    can never see a value this map does not know yet.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._possible: dict[str, set[str]] = {}

    def put(self, path: str, op_id: str) -> None:
        with self._lock:
            self._possible.setdefault(path, set()).add(op_id)

    def move(self, src: str, dst: str) -> None:
        with self._lock:
            self._possible.setdefault(dst, set()).update(self._possible.get(src, ()))

    def allows(self, path: str, op_id: str) -> bool:
        with self._lock:
            return op_id in self._possible.get(path, ())

    def paths(self) -> list[str]:
        with self._lock:
            return list(self._possible)


class Gate:
    """Lets workers run operations only while a region's mount is up.

    While a mount is restarted its mountpoint is a plain directory: an
    operation issued then would "succeed" on the wrong file system.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._active = 0

    def enter(self, stop: threading.Event) -> bool:
        with self._cond:
            while not self._open:
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
            self._active += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def close(self, timeout: float = 120.0) -> bool:
        """Stop new operations and wait for those in flight; False if some are still stuck."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._open = False
            while self._active and time.monotonic() < deadline:
                self._cond.wait(0.1)
            return self._active == 0

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()


def _status_of(exc: OSError) -> str:
    return FAIL if exc.errno in DEFINITE_ERRNOS else UNKNOWN


class Workload:
    """One writer and one reader per region, recording into one History."""

    def __init__(
        self,
        mounts: dict[str, Path],
        *,
        seed: int,
        pause: float = 0.02,
    ) -> None:
        self.mounts = mounts
        self.history = History()
        self.lineage = Lineage()
        self.gates = {region: Gate() for region in mounts}
        self.stop = threading.Event()
        self.pause = pause
        self._rng = random.Random(seed)
        self._threads: list[threading.Thread] = []

    def prepare(self) -> None:
        """Create every region's working directories (through its own mount), and the log."""
        for region, root in self.mounts.items():
            for d in (f"w-{region}", f"tmp-{region}"):
                os.makedirs(root / d, exist_ok=True)
        first = next(iter(self.mounts.values()))
        with open(first / APPEND_LOG, "ab"):
            pass

    def start(self) -> None:
        for region in self.mounts:
            for fn in (self._writer, self._reader, self._appender):
                rng = random.Random(self._rng.getrandbits(64))
                t = threading.Thread(
                    target=fn, args=(region, rng), name=f"chaos-{fn.__name__}-{region}"
                )
                t.daemon = True
                t.start()
                self._threads.append(t)

    def finish(self, timeout: float = 120.0) -> list[str]:
        """Stop issuing operations; return the names of threads still stuck in a call."""
        self.stop.set()
        for g in self.gates.values():
            g.open()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def _run(self, region: str, op: Op, call: Callable[[], None]) -> None:
        gate = self.gates[region]
        if not gate.enter(self.stop):
            return
        try:
            self.history.invoke(op)
            try:
                call()
                op.status = OK
            except OSError as exc:
                op.status = _status_of(exc)
                op.error = errno.errorcode.get(exc.errno or 0, str(exc))
        finally:
            op.end = time.monotonic()
            gate.leave()

    # -- the writer ------------------------------------------------------------------

    def _writer(self, region: str, rng: random.Random) -> None:
        root = self.mounts[region]
        live: list[str] = []  # names this writer believes exist (acknowledged)
        n = 0
        while not self.stop.is_set():
            n += 1
            op_id = f"{region}{n}"
            roll = rng.random()
            if not live or roll < 0.35:
                name = f"w-{region}/f{n}"
                self._put(region, root, op_id, name, live)
            elif roll < 0.6:
                self._put(region, root, op_id, rng.choice(live), live)
            elif roll < 0.85:
                src = rng.choice(live)
                dst = rng.choice(live) if rng.random() < 0.3 else f"w-{region}/r{n}"
                op = Op(op_id, region, "rename", src, dst)
                self.lineage.move(src, dst)
                self._run(region, op, functools.partial(os.rename, root / src, root / dst))
                if op.status == OK and src != dst:
                    live.remove(src)
                    if dst not in live:
                        live.append(dst)
            else:
                victim = rng.choice(live)
                op = Op(op_id, region, "unlink", victim)
                self._run(region, op, functools.partial(os.unlink, root / victim))
                if op.status == OK:
                    live.remove(victim)
            self.stop.wait(self.pause)

    def _put(self, region: str, root: Path, op_id: str, name: str, live: list[str]) -> None:
        tmp = root / f"tmp-{region}" / op_id
        data = value(op_id)
        op = Op(op_id, region, "put", name)
        self.lineage.put(name, op_id)
        published = False

        def call() -> None:
            nonlocal published
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            published = True
            os.rename(tmp, root / name)

        self._run(region, op, call)
        if op.status == UNKNOWN and not published:
            op.status = FAIL  # it never reached the rename: nothing can be at `name`
        if op.status == OK and name not in live:
            live.append(name)

    # -- the appender ----------------------------------------------------------------

    def _appender(self, region: str, rng: random.Random) -> None:
        path = self.mounts[region] / APPEND_LOG
        n = 0
        while not self.stop.is_set():
            n += 1
            op_id = f"{region}-append{n}"
            op = Op(op_id, region, "append", APPEND_LOG)

            def call(line: bytes = append_line(op_id)) -> None:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    if os.write(fd, line) != len(line):
                        raise OSError(errno.EIO, "short append")
                finally:
                    os.close(fd)

            self._run(region, op, call)
            self.stop.wait(self.pause * rng.uniform(0.5, 1.5))

    # -- the reader ------------------------------------------------------------------

    def _reader(self, region: str, rng: random.Random) -> None:
        root = self.mounts[region]
        n = 0
        while not self.stop.is_set():
            n += 1
            paths = self.lineage.paths()
            if not paths:
                self.stop.wait(0.05)
                continue
            path = rng.choice(paths)
            op = Op(f"{region}-read{n}", region, "read", path)

            def call(op: Op = op, path: str = path) -> None:
                try:
                    data = (root / path).read_bytes()
                except FileNotFoundError:
                    op.seen = ""
                    return
                op.seen = op_id_of(data) or f"<{len(data)} wrong bytes>"

            self._run(region, op, call)
            self.stop.wait(self.pause)
