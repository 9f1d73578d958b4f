"""The embedded log: one SQLite file in WAL mode, shared by the processes of one machine.

This is the backend of a volume that lives on one machine (several regions
in several processes, or one process for tests and demos). Its job is the
same as Kafka's: hand out strictly growing offsets, make a record durable
before `append` returns, and wake tail readers quickly.

Layout. One file may hold several volumes: `volumes` maps a name to a small
integer id, and `records` is keyed by (volume id, offset). Offsets are
allocated inside the write transaction as `max(offset) + 1`, so they are
dense (0, 1, 2, ...) and two writers can never pick the same one: SQLite
admits one writer at a time (`BEGIN IMMEDIATE` takes the write lock up front,
and other processes wait for it up to the busy timeout). A writer that
appended last appends again in one INSERT statement that also checks the
newest offset is still its own (a write statement takes the lock before it
reads); when another writer came in between, it inserts nothing and the
append reads the newest offset under the lock. A record is a row written in
a transaction, so a crash mid-append leaves either the whole row or
nothing: a partially written record is never visible.

Durability. WAL mode lets readers run beside the one writer without blocking
it. `synchronous=FULL` makes every commit fsync the WAL, so an offset that
`append` returned survives power loss, not only a crash of the process;
`NORMAL` would be durable against process crashes only, and an acknowledged
FUSE call must survive both (invariant 5). The fsync is what group commit
amortises.

Group commit. Appending threads queue their records; the first thread that
finds no commit in progress becomes the leader, takes the whole queue and
commits it in one transaction (one fsync), then hands the offsets back.
Threads that arrived during that commit queue up behind it; the leader
passes the lead to the oldest of them, which takes them all. The batch size
grows with the load by itself, no timer adds latency to a lone writer, and
each waiting thread is woken once (by name), not on every commit.

Tail reads. A reader that finds nothing waits on a per-file condition that
every commit in this process signals (sub-millisecond wake-up), and checks
`PRAGMA data_version` every `poll_interval` (2 ms by default) to notice
commits of other processes: that pragma reads a counter in the WAL index in
shared memory, so polling it costs microseconds and no disk I/O.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import unquote, urlsplit

from tidefs import private
from tidefs.journal.log import (
    JournalConfigError,
    JournalError,
    JournalUnavailable,
    Log,
    LogMissing,
    Record,
    boolean,
    positive_float,
    redact_url,
    url_options,
)

APPLICATION_ID = 0x74696466
"""`PRAGMA application_id` of a tidefs journal ("tidf"), so that a foreign SQLite file is refused."""

SCHEMA_VERSION = 1
"""`PRAGMA user_version` of the layout below; bump it with a migration."""

DEFAULT_TIMEOUT = 10.0
DEFAULT_POLL_INTERVAL = 0.002
SYNCHRONOUS_MODES = ("full", "extra", "normal")
ROWS_PER_INSERT = 100
"""Records per INSERT statement of an append (5 parameters each, far below SQLite's limit)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS records (
    volume_id    INTEGER NOT NULL REFERENCES volumes (id),
    log_offset   INTEGER NOT NULL,
    timestamp_ns INTEGER NOT NULL,
    -- The running maximum of timestamp_ns up to this offset: it never
    -- decreases, so "the first offset whose time is >= t" is one index probe
    -- even when writers' clocks disagree and timestamp_ns itself does not grow.
    max_ts_ns    INTEGER NOT NULL,
    payload      BLOB NOT NULL,
    PRIMARY KEY (volume_id, log_offset)
);
CREATE INDEX IF NOT EXISTS records_by_time ON records (volume_id, max_ts_ns, log_offset);
"""

_T = TypeVar("_T")


class _Notifier:
    """A commit counter per database file, shared by every SqliteLog of this process.

    It lets a tail reader wake the moment another thread of this process
    commits, instead of waiting for its next `data_version` poll.
    """

    _registry: ClassVar[dict[str, _Notifier]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.generation = 0

    @classmethod
    def for_path(cls, path: str) -> _Notifier:
        with cls._registry_lock:
            notifier = cls._registry.get(path)
            if notifier is None:
                notifier = cls._registry[path] = cls()
            return notifier

    def bump(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def wait(self, generation: int, timeout: float) -> None:
        """Wait up to `timeout` seconds while no commit happened since `generation`."""
        with self.cond:
            if self.generation == generation:
                self.cond.wait(timeout)


class _Pending:
    """One queued append, filled in by whichever thread commits it.

    `wake` is a lock held until the append is done or its thread is asked to
    lead the next batch: each waiter is woken exactly once, by name, instead
    of every waiter waking on every commit.
    """

    __slots__ = ("done", "error", "offset", "payload", "timestamp_ns", "wake")

    def __init__(self, payload: bytes, timestamp_ns: int) -> None:
        self.payload = payload
        self.timestamp_ns = timestamp_ns
        self.offset = -1
        self.error: BaseException | None = None
        self.done = False
        self.wake = threading.Lock()
        self.wake.acquire()

    def finish(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.error = error
        self.done = True
        self.wake.release()

    def result(self) -> int:
        if self.error is not None:
            raise self.error
        return self.offset


class SqliteLog(Log):
    """One volume's log in a SQLite file; safe to share between threads and processes.

    Options (URL query parameters or keyword arguments):
    - `timeout` (seconds, default 10): how long an append or open waits for
      another process's write lock before raising JournalUnavailable;
    - `synchronous` (`full`, `extra` or `normal`; default `full`): SQLite's
      durability level, `normal` survives process crashes but not power loss;
    - `poll_interval` (seconds, default 0.002): how often a blocked tail reader
      checks for commits of other processes;
    - `create` (default true): create the file and the volume's log when
      missing; false raises LogMissing instead (a mount never creates a log).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        volume: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        synchronous: str = "full",
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        create: bool = True,
    ) -> None:
        if not isinstance(volume, str) or not volume:
            raise JournalConfigError(f"volume name must be a non-empty string, not {volume!r}")
        if synchronous.lower() not in SYNCHRONOUS_MODES:
            raise JournalConfigError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}"
            )
        if timeout <= 0 or poll_interval <= 0:
            raise JournalConfigError("timeout and poll_interval must be positive")
        self.volume = volume
        self.path = Path(path)
        self.timeout = float(timeout)
        self.synchronous = synchronous.lower()
        self.poll_interval = float(poll_interval)
        self.create = bool(create)
        self.batches = 0
        """How many transactions appended records: fewer than appends when group commit batched."""

        self._check_path()
        if not self.create and not self.path.exists():
            raise LogMissing(f"journal file {self.path} does not exist")
        self._notifier = _Notifier.for_path(os.path.realpath(self.path))
        self._closed = False
        # Group commit: the queue of pending appends and whether a leader is committing.
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._committing = False
        self._last: tuple[int, int] | None = None
        """(offset, max_ts_ns) of the newest record this writer appended, unless an
        append failed since: where the next append expects to follow (`_insert_after`)."""
        self._misses = 0
        """Appends in a row whose `_insert_after` found another writer's record last."""
        self._skip = 0
        """Appends left that go straight to the locked path (`2 ** misses`, at most 64)."""
        # Readers borrow a connection each, so that concurrent reads never wait for one another.
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

        self._writer = self._guard("open", self._connect)
        try:
            self._volume_id = self._guard("open", self._initialise)
        except BaseException:
            self._writer.close()
            raise

    @classmethod
    def from_url(cls, url: str, volume: str, **options: object) -> SqliteLog:
        """Open `volume` at `sqlite:///path/log.db[?timeout=..&synchronous=..&poll_interval=..]`.

        Keyword options override the URL's query parameters.
        """
        shown = redact_url(url)
        parts = urlsplit(url)
        if parts.scheme != "sqlite":
            raise JournalConfigError(f"not a sqlite journal URL: {shown!r}")
        if parts.netloc:
            raise JournalConfigError(
                f"sqlite journal URL {shown!r} names a host ({urlsplit(shown).netloc!r}); "
                "use three slashes: sqlite:///path/log.db"
            )
        if parts.fragment:
            raise JournalConfigError(f"sqlite journal URL {shown!r} has a fragment")
        path = unquote(parts.path)
        if not path or path.endswith("/"):
            raise JournalConfigError(
                f"sqlite journal URL {shown!r} names no file: sqlite:///path/log.db"
            )
        # sqlite:////tmp/log.db (four slashes, as SQLAlchemy writes it) is /tmp/log.db, not //tmp.
        path = "/" + path.lstrip("/")
        merged = url_options(url, parts.query, options)
        known: dict[str, Callable[[object], object]] = {
            "timeout": positive_float,
            "synchronous": str,
            "poll_interval": positive_float,
            "create": boolean,
        }
        unknown = sorted(set(merged) - set(known))
        if unknown:
            raise JournalConfigError(
                f"unknown sqlite journal option(s) {', '.join(unknown)} in {shown!r}; "
                f"known: {', '.join(sorted(known))}"
            )
        kwargs = {name: _convert(name, value, known[name]) for name, value in merged.items()}
        return cls(path, volume, **kwargs)  # type: ignore[arg-type]

    # -- opening -------------------------------------------------------------

    def _check_path(self) -> None:
        """Refuse a path that cannot hold a database, naming it, before SQLite says only "unable to open"."""
        parent = self.path.parent
        if not parent.exists():
            raise JournalUnavailable(f"journal directory {parent} does not exist (for {self.path})")
        if not parent.is_dir():
            raise JournalUnavailable(
                f"journal directory {parent} is not a directory (for {self.path})"
            )
        if self.path.is_dir():
            raise JournalUnavailable(
                f"journal path {self.path} is a directory, not a database file"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            # WAL mode creates the -wal and -shm files beside the database.
            raise JournalUnavailable(
                f"journal directory {parent} is not writable (for {self.path})"
            )
        if self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
            raise JournalUnavailable(f"journal file {self.path} is not readable and writable")

    def _connect(self) -> sqlite3.Connection:
        # Created owner-only before SQLite would create it with the umask's mode:
        # SQLite gives the -wal and -shm files the database file's mode.
        with contextlib.suppress(FileExistsError):
            os.close(private.create_file(self.path, os.O_RDWR | os.O_EXCL))
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so that the
        # write lock is taken up front (IMMEDIATE) rather than on the first insert.
        conn = sqlite3.connect(
            self.path,
            timeout=self.timeout,
            isolation_level=None,
            check_same_thread=False,
            # An append's statement text depends on its batch size (up to
            # ROWS_PER_INSERT rows, on two paths): keep them all prepared.
            cached_statements=2 * ROWS_PER_INSERT + 32,
        )
        try:
            conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _initialise(self) -> int:
        """Switch to WAL, create or check the schema and register the volume; return its id."""
        conn = self._writer
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalUnavailable(f"journal {self.path} cannot use WAL mode (got {mode!r})")
        conn.execute("BEGIN IMMEDIATE")
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
            if app_id == 0 and tables == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif app_id != APPLICATION_ID:
                raise JournalConfigError(
                    f"{self.path} is a SQLite database but not a tidefs journal"
                )
            elif version != SCHEMA_VERSION:
                raise JournalConfigError(
                    f"journal {self.path} has layout version {version}; this tidefs reads {SCHEMA_VERSION}"
                )
            if self.create:
                conn.execute("INSERT OR IGNORE INTO volumes (name) VALUES (?)", (self.volume,))
            row = conn.execute("SELECT id FROM volumes WHERE name = ?", (self.volume,)).fetchone()
            if row is None:
                raise LogMissing(f"journal {self.path} holds no log of volume {self.volume!r}")
            (volume_id,) = row
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return int(volume_id)

    def _guard(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run `fn`, turning SQLite's errors into journal errors that name the file."""
        try:
            return fn()
        except sqlite3.IntegrityError as exc:
            # Offsets are allocated under the write lock: a duplicate means a broken invariant.
            raise JournalError(
                f"journal {self.path} (volume {self.volume!r}): {what}: {exc}"
            ) from exc
        except sqlite3.Error as exc:
            raise JournalUnavailable(
                f"journal {self.path} (volume {self.volume!r}): {what} failed: {exc}"
            ) from exc

    # -- appending -----------------------------------------------------------

    def append(self, payload: bytes, timestamp_ns: int | None = None) -> int:
        """Append one record and return its offset once it is committed and synced.

        The calling thread either commits a batch itself (when no commit is in
        progress) or waits until a leader has committed its record, or until
        it is asked to lead the next batch.
        """
        return self.append_many([(payload, timestamp_ns)])[0]

    def append_many(self, entries: Sequence[tuple[bytes, int | None]]) -> list[int]:
        """Append records in this order in one transaction; return their (consecutive) offsets.

        They are queued together, so whichever leader takes the queue commits
        all of them in the same transaction, next to each other. The calling
        thread leads, or waits until a leader committed them or handed it the
        lead (its first record being the oldest queued).
        """
        batch = [_Pending(_check_payload(p), _check_timestamp(t)) for p, t in entries]
        if not batch:
            return []
        first = batch[0]
        with self._cond:
            self._check_open()
            self._queue.extend(batch)
            lead = not self._committing
            self._committing = True
        if not lead:
            first.wake.acquire()
        if not first.done:
            self._lead()
        return [pending.result() for pending in batch]

    def _lead(self) -> None:
        """Commit everything queued, then pass the lead to the oldest waiter, if any.

        The leader's own record is in the batch: it was queued when the leader
        started, or it is the oldest waiter that was handed the lead.
        """
        with self._cond:
            batch, self._queue = self._queue, []
        error: BaseException | None = None
        try:
            self._commit(batch)
        except BaseException as exc:  # never strand the waiters, whatever happened
            error = exc
            raise
        finally:
            for pending in batch:
                pending.finish(error)
            with self._cond:
                if self._queue:
                    self._queue[0].wake.release()  # its thread leads; still committing
                else:
                    self._committing = False
                    self._cond.notify_all()  # only close() waits for this

    def _commit(self, batch: list[_Pending]) -> None:
        """Write `batch` in one transaction; set each entry's offset or error."""

        def write() -> None:
            last, self._last = self._last, None  # unknown again unless this append succeeds
            rows = None
            if self._skip:
                self._skip -= 1
            elif last is not None and len(batch) <= ROWS_PER_INSERT:
                rows = self._insert_after(last, batch)
                # Writers taking turns would each take the lock twice per append:
                # after a miss, leave the guess alone for a while (longer each time).
                self._misses = 0 if rows is not None else self._misses + 1
                self._skip = 0 if rows is not None else min(2**self._misses, 64)
            if rows is None:
                rows = self._insert_locked(batch)
            self._last = (rows[-1][1], rows[-1][3])
            for pending, row in zip(batch, rows, strict=True):
                pending.offset = row[1]

        try:
            self._guard(f"append of {len(batch)} record(s)", write)
        except JournalError as exc:
            for pending in batch:
                pending.error = exc
            return
        self.batches += 1
        self._notifier.bump()

    def _rows(self, batch: list[_Pending], offset: int, max_ts: int) -> list[tuple[Any, ...]]:
        """The rows of `batch` appended from `offset` on, after a record with `max_ts`."""
        rows = []
        for pending in batch:
            max_ts = max(max_ts, pending.timestamp_ns)
            rows.append((self._volume_id, offset, pending.timestamp_ns, max_ts, pending.payload))
            offset += 1
        return rows

    def _insert_after(
        self, last: tuple[int, int], batch: list[_Pending]
    ) -> list[tuple[Any, ...]] | None:
        """Append `batch` right after `last` (offset, max_ts) in one statement; None if it moved.

        `last` is the newest record this writer appended. If no other writer
        appended since, one INSERT (its own transaction, synced when it ends)
        checks that and appends: under load, every statement's return waits
        for the GIL behind the mount's other threads, and this is one
        statement where the locked path takes four. Otherwise it inserts
        nothing, and the caller takes the locked path.
        """
        conn = self._writer
        rows = self._rows(batch, last[0] + 1, last[1])
        # A write statement takes the write lock (waiting as BEGIN IMMEDIATE
        # does) before it reads: the check and the insert see the same log.
        cursor = conn.execute(
            "INSERT INTO records (volume_id, log_offset, timestamp_ns, max_ts_ns, payload) "
            "SELECT ?, column1, column2, column3, column4 FROM (VALUES "
            + ", ".join(["(?, ?, ?, ?)"] * len(rows))
            + ") WHERE (SELECT max(log_offset) FROM records WHERE volume_id = ?) = ?",
            [self._volume_id, *(v for row in rows for v in row[1:]), self._volume_id, last[0]],
        )
        return rows if cursor.rowcount == len(rows) else None

    def _insert_locked(self, batch: list[_Pending]) -> list[tuple[Any, ...]]:
        """Append `batch` after the newest record, read under the write lock."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT log_offset, max_ts_ns FROM records WHERE volume_id = ? "
                "ORDER BY log_offset DESC LIMIT 1",
                (self._volume_id,),
            ).fetchone()
            rows = self._rows(batch, *((0, 0) if row is None else (row[0] + 1, row[1])))
            # Many rows per statement: each statement is one step, and every
            # step gives up the GIL and must win it back.
            for i in range(0, len(rows), ROWS_PER_INSERT):
                chunk = rows[i : i + ROWS_PER_INSERT]
                conn.execute(
                    "INSERT INTO records (volume_id, log_offset, timestamp_ns, max_ts_ns, "
                    "payload) VALUES " + ", ".join(["(?, ?, ?, ?, ?)"] * len(chunk)),
                    [value for row in chunk for value in row],
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return rows

    # -- reading -------------------------------------------------------------

    def read(self, start: int, max_records: int = 1000, timeout: float = 0.0) -> list[Record]:
        """Return up to `max_records` records from `start` on, waiting up to `timeout` for one."""
        if start < 0:
            raise ValueError(f"start offset must be >= 0, not {start}")
        if max_records <= 0:
            return []
        deadline = time.monotonic() + max(0.0, timeout)
        conn = self._borrow()
        try:
            while True:
                # Read both change markers before the query, so that a commit
                # landing between the query and the wait is never missed.
                generation = self._notifier.generation
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                rows = conn.execute(
                    "SELECT log_offset, timestamp_ns, payload FROM records "
                    "WHERE volume_id = ? AND log_offset >= ? ORDER BY log_offset LIMIT ?",
                    (self._volume_id, start, max_records),
                ).fetchall()
                if rows:
                    return [Record(int(o), int(t), bytes(p)) for o, t, p in rows]
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return []
                    self._check_open()
                    self._notifier.wait(generation, min(remaining, self.poll_interval))
                    if self._notifier.generation != generation:
                        break
                    if conn.execute("PRAGMA data_version").fetchone()[0] != version:
                        break
        except sqlite3.Error as exc:
            raise JournalUnavailable(
                f"journal {self.path} (volume {self.volume!r}): read failed: {exc}"
            ) from exc
        finally:
            self._give_back(conn)

    def head(self) -> int:
        """Return the offset the next appended record will get."""
        row = self._query("SELECT max(log_offset) FROM records WHERE volume_id = ?", ())
        return 0 if row is None or row[0] is None else int(row[0]) + 1

    def offset_for_time(self, timestamp_ns: int) -> int:
        """Return the first offset whose append time is >= `timestamp_ns` (head() if none)."""
        row = self._query(
            "SELECT log_offset FROM records WHERE volume_id = ? AND max_ts_ns >= ? "
            "ORDER BY max_ts_ns, log_offset LIMIT 1",
            (timestamp_ns,),
        )
        return self.head() if row is None else int(row[0])

    def start(self) -> int:
        """Return the lowest offset still stored (records are never trimmed yet, so 0)."""
        row = self._query("SELECT min(log_offset) FROM records WHERE volume_id = ?", ())
        return 0 if row is None or row[0] is None else int(row[0])

    def _query(self, sql: str, params: tuple[object, ...]) -> tuple[Any, ...] | None:
        conn = self._borrow()
        try:
            row: tuple[Any, ...] | None = self._guard(
                "query", lambda: conn.execute(sql, (self._volume_id, *params)).fetchone()
            )
            return row
        finally:
            self._give_back(conn)

    def _borrow(self) -> sqlite3.Connection:
        with self._readers_lock:
            self._check_open()
            if self._readers:
                return self._readers.pop()
        return self._guard("open a reader", self._connect)

    def _give_back(self, conn: sqlite3.Connection) -> None:
        with self._readers_lock:
            if not self._closed:
                self._readers.append(conn)
                return
        conn.close()

    # -- closing -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError(f"journal {self.path} (volume {self.volume!r}) is closed")

    def close(self) -> None:
        """Close the connections once the appends already queued are committed."""
        with self._cond:
            if self._closed:
                return
            self._closed = True  # new appends fail from here on; queued ones still commit
            while self._committing:
                self._cond.wait()
            self._writer.close()
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        self._notifier.bump()  # wake blocked readers so that they see the log is closed

    def __repr__(self) -> str:
        return f"SqliteLog({str(self.path)!r}, volume={self.volume!r})"


def _check_payload(payload: object) -> bytes:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"a record payload must be bytes, not {type(payload).__name__}")
    return bytes(payload)


def _check_timestamp(timestamp_ns: int | None) -> int:
    if timestamp_ns is None:
        return time.time_ns()
    if timestamp_ns < 0:
        raise ValueError(f"timestamp_ns must be nanoseconds since the epoch, not {timestamp_ns}")
    return int(timestamp_ns)


def _convert(name: str, value: object, convert: Callable[[object], object]) -> object:
    try:
        return convert(value)
    except (TypeError, ValueError) as exc:
        raise JournalConfigError(f"invalid sqlite journal option {name}={value!r}: {exc}") from exc
