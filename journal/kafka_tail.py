"""Following the tail of a Kafka log across a slow link: staggered fetches.

A consumer learns of a new record by a fetch request parked at the broker:
the broker answers it the moment the record lands. librdkafka keeps one
fetch in flight per broker and sends the next only once the answer is back,
so across a link with one-way delay `d` the next request spends `d` on its
way back to the broker; a record that lands meanwhile waits for it and then
crosses the link: `2d` on average under a steady stream of records instead
of `d`, and up to `3d`.

`TailFetcher` keeps a fetch at the broker all the time instead. It speaks
Kafka's Fetch API itself (version 4, plaintext, uncompressed record batches:
what `KafkaLog` produces) over a few connections of its own, and while
records flow it sends one more fetch every `interval` over whichever
connection is free. Each request samples the log when it reaches the broker:
it is answered at once with what lies after its offset, or parks until a
record lands. A record therefore waits at most `interval` for the next
request to arrive, then crosses the link once. When no record has come for
`idle_after` seconds, one long-parked request at a time is enough (a lone
record wakes it, and crosses the link once) and traffic falls to one request
per `idle_wait`.

Requests sent before an answer came back carry an older offset, so their
answers repeat records already taken: whole batches below the next offset
are skipped by their header alone, and those staggered requests ask for at
most `sample_bytes` (the first batch always comes whole), which bounds what
one record costs the link. The fetched records stay in a bounded window that
several readers take from at their own offsets; a reader older than the
window reads elsewhere. When no reader has come for `dormant_after` seconds,
no request is sent until one does. A connection that breaks is dropped (its
request is asked again by the next one); anything else unexpected (an error
code, no answer in time, a refused connection, a compressed or transactional
batch, an old message format) stops the fetcher with a reason: the log then
reads through librdkafka as before, which reports the error properly
(`LogTrimmed`, `JournalUnavailable`).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections import deque

from tidefs.journal.log import Record

log = logging.getLogger(__name__)

_FETCH_KEY = 1
_FETCH_VERSION = 4
_READ_COMMITTED = 1
_BATCH_HEADER = 61  # bytes of a v2 record batch header, up to and including the record count
_COMPRESSION_MASK = 0x07
_LOG_APPEND_TIME = 0x08
_TRANSACTIONAL = 0x10
_CONTROL = 0x20


class TailStopped(Exception):
    """The fetcher cannot go on; the message says why."""


class TailUnsupported(TailStopped):
    """The log holds what the fetcher does not decode (compressed, transactional, old batches)."""


class TailFetcher:
    """Follow one single-partition topic from `start`, handing records out in order.

    `address` is the partition leader's (host, port). The fetcher runs one
    thread; readers take from it at their own offsets, from any thread.
    """

    def __init__(
        self,
        address: tuple[str, int],
        topic: str,
        start: int,
        *,
        timestamp_header: str,
        interval: float = 0.008,
        max_connections: int = 16,
        idle_after: float = 1.0,
        idle_wait: float = 0.5,
        max_bytes: int = 8 << 20,
        sample_bytes: int = 1 << 20,
        dormant_after: float = 30.0,
        keep_records: int = 20_000,
        keep_bytes: int = 64 << 20,
        ahead: int = 1_000,
        connect_timeout: float = 10.0,
        client_id: str = "tidefs-tail",
    ) -> None:
        self.address = address
        self._where = f"the broker at {address[0]}:{address[1]}"
        self.topic = topic
        self.interval = interval
        self.max_connections = max_connections
        self.idle_after = idle_after
        self.idle_wait_ms = max(1, int(idle_wait * 1000))
        self.max_bytes = max_bytes
        self.sample_bytes = min(sample_bytes, max_bytes)
        self.dormant_after = dormant_after
        self._waiting = 0  # readers inside take(), waiting for records
        self.keep_records = keep_records
        self.keep_bytes = keep_bytes
        # A reader may start this far beyond what was fetched: one that
        # folded the records it appended itself is ahead of the fetch.
        self.ahead = ahead
        self.connect_timeout = connect_timeout
        self._client_id = client_id.encode()
        self._header_key = timestamp_header.encode()
        self._cond = threading.Condition()
        # The window of fetched records kept for the readers: every record
        # from offset `_low` up to `_next` (exclusive) is in `_records`.
        self._records: list[Record] = []
        self._offsets: list[int] = []
        self._kept_bytes = 0
        self._low = start
        self._next = start  # the offset the next request asks for
        # (send time, high watermark) of the answer to the latest request sent
        self._end: tuple[float, int] = (0.0, 0)
        self.failure: str | None = None
        self.unsupported = False  # the failure is the log's format: trying again cannot help
        self.last_take = time.monotonic()
        self.requests = 0
        self._last_record = 0.0
        self._closed = False
        self._selector = selectors.DefaultSelector()
        self._free: deque[_Connection] = deque()  # used in turn, so that none sits idle for long
        self._busy: set[_Connection] = set()
        self._connecting: set[_Connection] = set()
        self._correlation = 0
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"tidefs-tail-{topic}", daemon=True)
        self._thread.start()

    # -- the reader's side ---------------------------------------------------------------

    def covers(self, start: int) -> bool:
        """Whether records from `start` on are (or will be) served here."""
        with self._cond:
            return self.failure is None and self._serves(start)

    def _serves(self, start: int) -> bool:
        return self._low <= start <= self._next + self.ahead

    def end_since(self, since: float) -> int | None:
        """The log's end (high watermark) as a request sent at or after `since` found it, if any.

        The broker answered such a request after `since`, so every record
        that existed at `since` lies below it: a reader whose wait is over
        learns whether records it has not got exist, without asking again.
        """
        sent_at, high = self._end
        return high if sent_at >= since else None

    def in_use(self, within: float) -> bool:
        """Whether a reader waits in `take` now, or took within the last `within` seconds."""
        with self._cond:
            return self._waiting > 0 or time.monotonic() - self.last_take < within

    def take(self, start: int, max_records: int, timeout: float) -> list[Record] | None:
        """Records from `start` on, waiting up to `timeout` for one; None if this fetcher cannot serve.

        None means: stopped, or `start` is outside the window of records kept
        here (older than the oldest kept, or further beyond what was fetched
        than `ahead`); the caller reads another way. Several readers may take at their own offsets.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            now = time.monotonic()
            if now - self.last_take > self.dormant_after:
                self._wake()  # the fetching thread stopped asking: a reader is back
            self.last_take = now
            while True:
                if not self._serves(start):
                    return None
                if self._offsets and self._offsets[-1] >= start:
                    break
                if self.failure is not None or self._closed:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._waiting += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._waiting -= 1
                    self.last_take = time.monotonic()
            i = bisect.bisect_left(self._offsets, start)
            return self._records[i : i + max_records]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._wake()
        self._thread.join(10)

    # -- the fetching thread -------------------------------------------------------------

    def _run(self) -> None:
        self._selector.register(self._waker_r, selectors.EVENT_READ, None)
        next_tick = 0.0
        try:
            while not self._closed:
                now = time.monotonic()
                flowing = now - self._last_record < self.idle_after
                dormant = not self.in_use(self.dormant_after)
                if dormant:
                    pass  # nobody reads: ask nothing until take() wakes this thread
                elif flowing and now >= next_tick:
                    # Every connection busy: this tick is skipped, not retried in a spin.
                    self._send(max(1, int(self.interval * 2000)), self.sample_bytes)
                    next_tick = now + self.interval
                elif not self._busy and not self._connecting:
                    self._send(self.idle_wait_ms, self.max_bytes)
                wait = max(0.0, next_tick - time.monotonic()) if flowing and not dormant else 1.0
                for key, _ in self._selector.select(min(wait, 1.0)):
                    if key.data is None:
                        self._drain_waker()
                    elif key.data in self._connecting:
                        self._connected(key.data)
                    else:
                        self._receive(key.data)
                self._check_answered()
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if not self._closed:
                expected = (OSError, TailStopped, struct.error, ValueError, IndexError)
                if isinstance(exc, expected):
                    log.info("tail fetcher of %s stopped: %s", self.topic, reason)
                else:
                    log.exception("tail fetcher of %s failed", self.topic)
            with self._cond:
                self.failure = reason
                self.unsupported = isinstance(exc, TailUnsupported)
                self._cond.notify_all()
        finally:
            for conn in [*self._free, *self._busy, *self._connecting]:
                conn.sock.close()
            self._selector.close()
            self._waker_r.close()
            self._waker_w.close()

    def _check_answered(self) -> None:
        """Stop if a request went unanswered: a link that drops packets closes nothing."""
        now = time.monotonic()
        for conns, what in (
            (self._busy, "no answer from"),
            (self._connecting, "cannot connect to"),
        ):
            if any(now > conn.due for conn in conns):
                raise TailStopped(f"{what} {self._where} within {self.connect_timeout:g}s")

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # already gone: nothing left to wake
            self._waker_w.send(b"\0")

    def _drain_waker(self) -> None:
        try:
            while self._waker_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _send(self, max_wait_ms: int, max_bytes: int) -> bool:
        """Send one fetch from the current offset; False if every connection is busy."""
        if not self._free:
            if len(self._busy) + len(self._connecting) < self.max_connections:
                self._connect()  # used once connected: no waiting a round trip here
            return False
        conn = self._free.popleft()
        self._correlation = (self._correlation + 1) & 0x7FFFFFFF
        conn.correlation = self._correlation
        conn.sent_at = time.monotonic()
        conn.due = conn.sent_at + max_wait_ms / 1000 + self.connect_timeout
        self._busy.add(conn)
        try:
            conn.sock.sendall(self._request(self._correlation, self._next, max_wait_ms, max_bytes))
        except OSError as exc:
            self._drop(conn, exc)
            return False
        self.requests += 1
        return True

    def _connect(self) -> None:
        """Start connecting one more connection, without blocking this thread."""
        found = socket.getaddrinfo(*self.address, type=socket.SOCK_STREAM)
        family, kind, proto, _name, addr = found[0]
        conn = _Connection(socket.socket(family, kind, proto))
        conn.due = time.monotonic() + self.connect_timeout
        err = conn.sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            conn.sock.close()
            raise self._refused(err)
        self._connecting.add(conn)
        self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)

    def _connected(self, conn: _Connection) -> None:
        self._connecting.discard(conn)
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._selector.unregister(conn.sock)
            conn.sock.close()
            raise self._refused(err)
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
        self._free.append(conn)

    def _refused(self, err: int) -> OSError:
        return OSError(err, f"cannot connect to {self._where}: {os.strerror(err)}")

    def _drop(self, conn: _Connection, why: object) -> None:
        """Forget a broken connection; its request, if any, is asked again by the next one."""
        log.debug("tail fetcher of %s drops a connection: %s", self.topic, why)
        self._busy.discard(conn)
        self._connecting.discard(conn)
        with contextlib.suppress(ValueError):
            self._free.remove(conn)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()

    def _request(self, correlation: int, offset: int, max_wait_ms: int, max_bytes: int) -> bytes:
        topic = self.topic.encode()
        body = b"".join(
            (
                struct.pack(">hhih", _FETCH_KEY, _FETCH_VERSION, correlation, len(self._client_id)),
                self._client_id,
                # replica id (a consumer), max wait, min bytes, max bytes, isolation level
                struct.pack(">iiiib", -1, max_wait_ms, 1, max_bytes, _READ_COMMITTED),
                struct.pack(">ih", 1, len(topic)),
                topic,
                struct.pack(">iiqi", 1, 0, offset, max_bytes),
            )
        )
        return struct.pack(">i", len(body)) + body

    def _receive(self, conn: _Connection) -> None:
        why: object = "closed by the broker"
        try:
            data = conn.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError as exc:
            data, why = b"", exc
        if not data:
            self._drop(conn, why)  # idle connections are closed by brokers routinely
            return
        conn.pending += data
        while len(conn.pending) >= 4:
            size = struct.unpack_from(">i", conn.pending)[0]
            if size < 8:
                raise TailStopped(f"an answer of {size} bytes")
            if len(conn.pending) < 4 + size:
                return
            frame = bytes(conn.pending[4 : 4 + size])
            del conn.pending[: 4 + size]
            if struct.unpack_from(">i", frame)[0] != conn.correlation:
                raise TailStopped("an answer to a request that was not asked")
            self._busy.discard(conn)
            self._free.append(conn)
            self._answer(frame, conn.sent_at)

    def _answer(self, frame: bytes, sent_at: float) -> None:
        # correlation id, throttle time, one topic: name, one partition
        pos = 8
        topics = struct.unpack_from(">i", frame, pos)[0]
        if topics != 1:
            raise TailStopped(f"an answer about {topics} topics")
        pos += 4
        pos += 2 + struct.unpack_from(">h", frame, pos)[0]
        partitions, _index, error = struct.unpack_from(">iih", frame, pos)
        if partitions != 1:
            raise TailStopped(f"an answer about {partitions} partitions")
        if error:
            raise TailStopped(f"the broker answered a fetch with error code {error}")
        high = struct.unpack_from(">q", frame, pos + 10)[0]
        if sent_at >= self._end[0]:
            self._end = (sent_at, high)
        pos += 10 + 16  # past count, index, error, high watermark, last stable offset
        aborted = struct.unpack_from(">i", frame, pos)[0]
        if aborted > 0:
            raise TailUnsupported("aborted transactions in the log")
        pos += 4
        size = struct.unpack_from(">i", frame, pos)[0]
        pos += 4
        if size <= 0:
            return
        before = self._next
        records = self._batches(frame, pos, pos + size)
        if self._next != before:
            with self._cond:
                self._keep(records)
                self._cond.notify_all()
            self._last_record = time.monotonic()

    def _keep(self, records: list[Record]) -> None:
        """Add `records` to the window; forget the oldest beyond its bounds (a slow reader reads elsewhere)."""
        self._records += records
        self._offsets += [r.offset for r in records]
        self._kept_bytes += sum(len(r.payload) for r in records)
        # Trimmed in chunks: deleting from the front of a list copies the rest.
        chunk = max(1, self.keep_records // 8)
        if len(self._records) <= self.keep_records + chunk and self._kept_bytes <= self.keep_bytes:
            return
        drop = max(0, len(self._records) - self.keep_records)
        dropped = sum(len(r.payload) for r in self._records[:drop])
        while drop < len(self._records) - 1 and self._kept_bytes - dropped > self.keep_bytes:
            dropped += len(self._records[drop].payload)
            drop += 1
        del self._records[:drop]
        del self._offsets[:drop]
        self._kept_bytes -= dropped
        self._low = self._offsets[0]

    def _batches(self, data: bytes, pos: int, end: int) -> list[Record]:
        """Decode the record batches in data[pos:end] holding offsets >= self._next."""
        out: list[Record] = []
        while pos + _BATCH_HEADER <= end:
            base, length = struct.unpack_from(">qi", data, pos)
            if length < _BATCH_HEADER - 12:
                raise TailStopped(f"a record batch of {length} bytes")
            stop = pos + 12 + length
            if stop > end:
                break  # the broker cut the last batch at max_bytes: fetched again next time
            magic = data[pos + 16]
            if magic != 2:
                raise TailUnsupported(f"a record batch in the old format (magic {magic})")
            attributes, last_delta, base_ts, max_ts = struct.unpack_from(">hiqq", data, pos + 21)
            last = base + last_delta
            if last >= self._next:
                if attributes & _COMPRESSION_MASK:
                    raise TailUnsupported("a compressed record batch")
                if attributes & _TRANSACTIONAL:
                    raise TailUnsupported("a transactional record batch")
                if not attributes & _CONTROL:
                    count = struct.unpack_from(">i", data, pos + 57)[0]
                    log_append = bool(attributes & _LOG_APPEND_TIME)
                    first = pos + _BATCH_HEADER
                    stamps = (base_ts, max_ts, log_append)
                    if self._decode_records(data, first, count, base, stamps, out) != stop:
                        raise TailStopped("a record batch whose records do not fill it")
                self._next = last + 1
            pos = stop
        return out

    def _decode_records(
        self,
        data: bytes,
        pos: int,
        count: int,
        base: int,
        stamps: tuple[int, int, bool],
        out: list[Record],
    ) -> int:
        """Decode `count` records from `pos`; return where they end."""
        base_ts, max_ts, log_append = stamps
        for _ in range(count):
            length, pos = _varint(data, pos)
            end = pos + length
            pos += 1  # record attributes
            ts_delta, pos = _varint(data, pos)
            offset_delta, pos = _varint(data, pos)
            key_len, pos = _varint(data, pos)
            pos += max(0, key_len)
            value_len, pos = _varint(data, pos)
            value = data[pos : pos + value_len] if value_len >= 0 else b""
            pos += max(0, value_len)
            timestamp_ns = (max_ts if log_append else base_ts + ts_delta) * 1_000_000
            headers, pos = _varint(data, pos)
            for _ in range(headers):
                hk_len, pos = _varint(data, pos)
                hkey = data[pos : pos + hk_len]
                pos += hk_len
                hv_len, pos = _varint(data, pos)
                if hkey == self._header_key and hv_len == 8:
                    timestamp_ns = int.from_bytes(data[pos : pos + 8], "big")
                pos += max(0, hv_len)
            if pos != end:
                raise TailStopped("a record whose length does not match its fields")
            offset = base + offset_delta
            if offset >= self._next:
                out.append(Record(offset, timestamp_ns, bytes(value)))
                self._next = offset + 1
        return pos


class _Connection:
    __slots__ = ("correlation", "due", "pending", "sent_at", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock = sock
        self.pending = bytearray()
        self.correlation = -1
        self.due = 0.0  # when the answer to the request in flight is overdue
        self.sent_at = 0.0  # when the request in flight was sent


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode one zigzag varint at `pos`; return (value, next position)."""
    shift = 0
    raw = 0
    while True:
        byte = data[pos]
        pos += 1
        raw |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (raw >> 1) ^ -(raw & 1), pos
        shift += 7
        if shift > 63:
            raise TailStopped("a varint longer than 64 bits")
