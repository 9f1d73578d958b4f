"""The distributed log: one single-partition Apache Kafka topic per volume.

A volume's log is the topic `tidefs.<volume>.log` with exactly one partition
(one partition is what gives one total order) and infinite retention (the
log is the source of truth; trimming it is a decision for snapshots, not for
a broker default). The topic is created when missing.

Appending. The producer is idempotent with `acks=all`: a retried produce
after a lost response cannot write the record twice, and a delivery report
means every in-sync replica has it. `append` produces and waits for that
report; a background thread polls the producer so that reports are handed
out the moment they arrive. Many threads appending at once are batched by
librdkafka into one produce request (`linger_ms` is the short window in
which a batch gathers), which is Kafka's form of group commit.

Bounded waits. Every call that talks to the broker has a deadline derived
from `timeout` (10 s by default): `message.timeout.ms` bounds delivery,
`socket.timeout.ms` bounds requests, and admin and metadata calls get
explicit time-outs. An unreachable broker therefore surfaces as
JournalUnavailable instead of a hang. A time-out after `produce` does not
say the record was not written (it may land later): callers that retry
carry the same request id, and the fold applies it once.

Timestamps. Kafka keeps milliseconds; a record also carries its exact
nanosecond timestamp in a header, and `offset_for_time` refines Kafka's
millisecond answer by reading the few records of that millisecond.

Reading. Records are fetched by consumers that the log owns and assigns by
hand (no consumer group, no committed offsets: the reader's position lives
with the caller, e.g. the fold's applied offset). A small pool of consumers
lets several readers follow the log at once; each remembers its position, so
a reader that asks for the next record continues without a seek. Offsets may
have gaps (transaction markers), so nothing here assumes `next == last + 1`.
Readers that wait at the tail (the fold, the replicator) are served by one
`TailFetcher` instead (see `tidefs.journal.kafka_tail`): librdkafka keeps
one fetch in flight, and across a slow link a record landing while the next
fetch travels waits a round trip for it; the tail fetcher keeps a request at
the broker all the time. It starts once a reader is within a thousand
records of the head, and gives way to the consumers above on any error.

Trimming. Records below some offset may be deleted from the topic (Kafka's
`delete-records`, once snapshots cover them): `start()` is then the topic's
low watermark. A read that starts below it raises `LogTrimmed` instead of
letting the consumer skip ahead to the first record still stored, which
would fold a state on without the records it never saw. The check costs one
request when a reader is positioned anew; a reader that continues asks only
when the next record is not the one it expected (a trim under its feet makes
the consumer jump to the new start, which looks like such a gap).

Credentials. librdkafka settings (SASL, TLS) may be given in the journal
URL, but a URL shows in `ps` and in messages; secrets belong in the
environment or a properties file instead (`client_settings`): the settings
of `TIDEFS_KAFKA_CONFIG` (a file readable by its owner only, as written by
`tidefs --kafka-config FILE`) override the URL's, and `TIDEFS_KAFKA_<NAME>`
variables (`TIDEFS_KAFKA_SASL_PASSWORD` is `sasl.password`) override both.
Every URL this module quotes goes through `redact_url`.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar
from urllib.parse import urlsplit

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from tidefs.journal.kafka_tail import TailFetcher
from tidefs.journal.log import (
    KAFKA_CONFIG_ENV,
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

log = logging.getLogger(__name__)

TOPIC_FORMAT = "tidefs.{volume}.log"
"""The topic that holds a volume's log."""

TIMESTAMP_HEADER = "tidefs-ts-ns"
"""Header with the record's exact timestamp (ns, 8 bytes big-endian); Kafka's own is in ms."""

DEFAULT_TIMEOUT = 10.0
DEFAULT_LINGER_MS = 1.0
DEFAULT_MAX_RECORD_BYTES = 8 << 20
DEFAULT_MAX_READERS = 4
DEFAULT_TAIL_INTERVAL_MS = 8.0
DEFAULT_TAIL_CONNECTIONS = 16
_TAIL_RETRY = 5.0
"""Seconds before a stopped tail fetcher is tried again (reads go through librdkafka meanwhile)."""
_TAIL_OVERDUE = 2.0
"""Seconds the tail fetcher gets to bring records the watermark says exist."""
_TAIL_CATCH_UP = 1000
"""A reader further behind the head than this many records catches up through librdkafka."""
_TAIL_ABANDONED = 1.0
"""Seconds without a take after which a tail fetcher may be moved to another offset."""
_VOLUME_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_C = TypeVar("_C")
_BATCH_OVERHEAD = 64 << 10
"""Room above `max_record_bytes` for the record batch framing and headers."""

SETTING_ENV_PREFIX = "TIDEFS_KAFKA_"
"""`TIDEFS_KAFKA_SASL_PASSWORD=x` is the librdkafka setting `sasl.password=x`."""

NOT_SETTINGS = frozenset({KAFKA_CONFIG_ENV, "TIDEFS_KAFKA_LIBS"})
"""Variables with the prefix that are not settings (the file; the test broker's jars)."""


def read_properties(path: str) -> dict[str, str]:
    """Read a librdkafka properties file (`name=value` lines, `#` comments).

    The file holds secrets, so one that another user could read or change is
    refused, as ssh refuses a private key: it must belong to the caller (or
    root) and carry no group or other permission bits. Messages name the
    file and line, never a value.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise JournalConfigError(
            f"cannot read Kafka config file {path}: {exc.strerror or exc}"
        ) from exc
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise JournalConfigError(f"Kafka config file {path} is not a regular file")
        if st.st_uid not in (os.getuid(), 0) or st.st_mode & 0o077:
            raise JournalConfigError(
                f"Kafka config file {path} may hold secrets but is open to other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}): make it yours "
                "and mode 600 (chmod 600)"
            )
        settings: dict[str, str] = {}
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith(("#", "!")):
                continue
            name, sep, value = text.partition("=")
            if not sep or not name.strip():
                raise JournalConfigError(
                    f"Kafka config file {path}, line {number}: expected name=value"
                )
            settings[name.strip()] = value.strip()
    return settings


def client_settings(
    url_settings: Mapping[str, object], environ: Mapping[str, str] | None = None
) -> dict[str, object]:
    """Merge librdkafka settings: the URL's, then the config file's, then the environment's.

    Later sources win. The file is named by `TIDEFS_KAFKA_CONFIG`; a variable
    `TIDEFS_KAFKA_SSL_KEY_PASSWORD` is the setting `ssl.key.password`
    (lower case, `_` for `.`).
    """
    env = os.environ if environ is None else environ
    merged: dict[str, object] = dict(url_settings)
    path = env.get(KAFKA_CONFIG_ENV)
    if path:
        merged.update(read_properties(path))
    for var, value in env.items():
        if var.startswith(SETTING_ENV_PREFIX) and var not in NOT_SETTINGS:
            name = var[len(SETTING_ENV_PREFIX) :].lower().replace("_", ".")
            if name:
                merged[name] = value
    return merged


class LogTrimmed(JournalError):
    """A read asked for records below the log's start: they were deleted (the topic was trimmed)."""

    def __init__(self, volume: str, start: int, wanted: int) -> None:
        super().__init__(
            f"the log of volume {volume!r} starts at offset {start} (older records were "
            f"deleted), so the records from offset {wanted} on cannot be read: a state at "
            f"offset {wanted - 1} cannot catch up; start it from a snapshot instead (an empty "
            "state directory starts from the newest usable snapshot)"
        )
        self.start = start
        self.wanted = wanted


class KafkaLog(Log):
    """One volume's log in a single-partition Kafka topic; safe to share between threads.

    Options (URL query parameters or keyword arguments):
    - `timeout` (seconds, default 10): bound on opening and on each append,
      read, head or offset_for_time call before JournalUnavailable;
    - `linger_ms` (default 1): how long the producer gathers concurrent
      appends into one request; more batches better, at that cost in latency;
    - `replication_factor` (default: the broker's `default.replication.factor`)
      and `min_insync_replicas` (default: the broker's) for a topic created here;
    - `max_record_bytes` (default 8 MiB): the largest payload accepted;
    - `create` (default true): create the topic when it is missing;
    - `max_readers` (default 4): consumers kept for concurrent reads;
    - `tail_interval_ms` (default 8; 0 turns it off): a reader that follows
      the log's tail gets its records from staggered fetches sent this often
      while records flow (see `tidefs.journal.kafka_tail`), instead of
      librdkafka's one fetch in flight; `tail_connections` (default 16)
      bounds the connections that takes. Off when TLS or SASL is configured;
    - any option whose name contains a dot (`security.protocol`, ...) is passed
      to every librdkafka client unchanged.
    """

    def __init__(
        self,
        bootstrap: str,
        volume: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        linger_ms: float = DEFAULT_LINGER_MS,
        replication_factor: int = -1,
        min_insync_replicas: int | None = None,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        create: bool = True,
        max_readers: int = DEFAULT_MAX_READERS,
        tail_interval_ms: float = DEFAULT_TAIL_INTERVAL_MS,
        tail_connections: int = DEFAULT_TAIL_CONNECTIONS,
        client_config: dict[str, object] | None = None,
    ) -> None:
        if not isinstance(volume, str) or not _VOLUME_RE.match(volume):
            raise JournalConfigError(
                f"volume name {volume!r} cannot name a Kafka topic: use 1-200 of [A-Za-z0-9._-]"
            )
        if (
            timeout <= 0
            or linger_ms < 0
            or max_record_bytes <= 0
            or max_readers <= 0
            or tail_interval_ms < 0
            or tail_connections <= 0
        ):
            raise JournalConfigError(
                "timeout, max_record_bytes, max_readers and tail_connections must be positive, "
                "linger_ms and tail_interval_ms >= 0"
            )
        self.volume = volume
        self.bootstrap = bootstrap
        self.topic = TOPIC_FORMAT.format(volume=volume)
        self.timeout = float(timeout)
        self.max_record_bytes = int(max_record_bytes)
        self._tp = TopicPartition(self.topic, 0)
        self._last_error = ""
        self._closed = False
        ms = max(10, int(self.timeout * 1000))
        self._common: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "client.id": f"tidefs-{volume}",
            "socket.timeout.ms": ms,
            # Come back quickly after a broker restart instead of backing off for 10 s.
            "reconnect.backoff.ms": 50,
            "reconnect.backoff.max.ms": 1000,
            "error_cb": self._on_error,
            "logger": log,
            # Brokers close idle connections; that is routine, not worth a log line.
            "log.connection.close": False,
            # Every request is small and waits for its answer: Nagle would hold
            # a produce or fetch request back until the previous segment's ACK,
            # which the peer may delay (tens of ms per record in the tail).
            "socket.nagle.disable": True,
            **(client_config or {}),
        }

        deadline = time.monotonic() + self.timeout
        admin = self._client(AdminClient, {})
        self._ensure_topic(admin, deadline, create, int(replication_factor), min_insync_replicas)

        self._producer = self._client(
            Producer,
            {
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": linger_ms,
                "message.timeout.ms": ms,
                "request.timeout.ms": min(ms, 30000),
                "message.max.bytes": self.max_record_bytes + _BATCH_OVERHEAD,
            },
        )
        self._stop = threading.Event()
        self._poller = threading.Thread(
            target=self._poll_producer, name=f"tidefs-kafka-{volume}", daemon=True
        )
        self._poller.start()

        # Watermarks and offsets_for_times go through their own consumer, so
        # that head() never waits behind a reader blocked on the tail.
        self._meta = self._new_consumer()
        self._meta_lock = threading.Lock()
        self._readers: list[_Reader] = []
        self._idle: list[_Reader] = []
        self._max_readers = int(max_readers)
        self._readers_cond = threading.Condition()
        self._known_head = 0
        # The tail fetcher speaks plaintext Kafka itself: not where TLS or SASL is asked for.
        secured = any(
            key.startswith(("ssl.", "sasl."))
            or (key == "security.protocol" and str(value).lower() != "plaintext")
            for key, value in (client_config or {}).items()
        )
        self._tail_interval = 0.0 if secured else tail_interval_ms / 1000
        self._tail_connections = int(tail_connections)
        self._tail: TailFetcher | None = None
        self._tail_lock = threading.Lock()
        self._tail_retry = 0.0
        self.tail_failure: str | None = None
        """Why the tail fetcher last stopped (reads then went through librdkafka)."""

    @classmethod
    def from_url(cls, url: str, volume: str, **options: object) -> KafkaLog:
        """Open `volume` at `kafka://host:port[,host:port][?timeout=..&linger_ms=..]`.

        Keyword options override the URL's query parameters.
        """
        shown = redact_url(url)
        parts = urlsplit(url)
        if parts.scheme != "kafka":
            raise JournalConfigError(f"not a kafka journal URL: {shown!r}")
        if parts.path not in ("", "/") or parts.fragment:
            raise JournalConfigError(
                f"kafka journal URL {shown!r} has a path; expected kafka://host:port[,host:port]"
            )
        if "@" in parts.netloc:
            raise JournalConfigError(
                f"kafka journal URL {shown!r} names a user: give SASL credentials as "
                f"{SETTING_ENV_PREFIX}SASL_USERNAME and {SETTING_ENV_PREFIX}SASL_PASSWORD "
                "or in a --kafka-config file"
            )
        hosts = [h.strip() for h in parts.netloc.split(",")] if parts.netloc else []
        if not hosts:
            raise JournalConfigError(f"kafka journal URL {shown!r} names no broker")
        for host in hosts:
            name, sep, port = host.rpartition(":")
            if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
                raise JournalConfigError(f"kafka journal URL {shown!r}: {host!r} is not host:port")
        merged = url_options(url, parts.query, options)
        converters: dict[str, Callable[[object], object]] = {
            "timeout": positive_float,
            "linger_ms": _non_negative_float,
            "replication_factor": _int,
            "min_insync_replicas": _int,
            "max_record_bytes": _int,
            "create": boolean,
            "max_readers": _int,
            "tail_interval_ms": _non_negative_float,
            "tail_connections": _int,
        }
        kwargs: dict[str, Any] = {}
        client_config: dict[str, object] = dict(
            merged.pop("client_config", None) or {}  # type: ignore[call-overload]
        )
        for name, value in merged.items():
            if "." in name:
                client_config[name] = value
            elif name in converters:
                try:
                    kwargs[name] = converters[name](value)
                except (TypeError, ValueError) as exc:
                    raise JournalConfigError(
                        f"invalid kafka journal option {name}={value!r}: {exc}"
                    ) from exc
            else:
                raise JournalConfigError(
                    f"unknown kafka journal option {name!r} in {shown!r}; known: "
                    f"{', '.join(sorted(converters))} and librdkafka settings (with a dot)"
                )
        client_config = client_settings(client_config)
        servers = client_config.pop("bootstrap.servers", None)
        if servers is not None and sorted(h.strip() for h in str(servers).split(",")) != sorted(
            hosts
        ):
            raise JournalConfigError(
                f"bootstrap.servers {servers!r} differs from the brokers of the journal URL "
                f"{shown!r}: name the brokers in the URL only"
            )
        return cls(",".join(hosts), volume, client_config=client_config, **kwargs)

    # -- opening -------------------------------------------------------------

    def _ensure_topic(
        self,
        admin: AdminClient,
        deadline: float,
        create: bool,
        replication_factor: int,
        min_insync_replicas: int | None,
    ) -> None:
        """Find (or create) the volume's topic and wait until its partition has a leader."""
        created = False
        while True:
            # Listing every topic (not asking for ours by name) never triggers a
            # broker's auto-creation with default partitions and retention.
            metadata = self._call(lambda left: admin.list_topics(timeout=left), "open", deadline)
            topic = metadata.topics.get(self.topic)
            if topic is not None and topic.error is None:
                if len(topic.partitions) != 1:
                    raise JournalConfigError(
                        f"Kafka topic {self.topic} has {len(topic.partitions)} partitions; "
                        "a tidefs log needs exactly one (one total order)"
                    )
                if all(p.leader >= 0 and p.error is None for p in topic.partitions.values()):
                    return
            elif not create:
                raise LogMissing(
                    f"Kafka topic {self.topic} for volume {self.volume!r} does not exist "
                    f"on {self.bootstrap} (and create=false)"
                )
            elif not created:
                self._create_topic(admin, deadline, replication_factor, min_insync_replicas)
                created = True
            if time.monotonic() >= deadline:
                raise JournalUnavailable(
                    f"Kafka topic {self.topic} on {self.bootstrap} has no partition leader "
                    f"after {self.timeout}s"
                )
            time.sleep(0.05)

    def _create_topic(
        self,
        admin: AdminClient,
        deadline: float,
        replication_factor: int,
        min_insync_replicas: int | None,
    ) -> None:
        config = {
            "retention.ms": "-1",
            "retention.bytes": "-1",
            "cleanup.policy": "delete",
            # Keep the writer's clock: offset_for_time answers in the writers' terms.
            "message.timestamp.type": "CreateTime",
            "max.message.bytes": str(self.max_record_bytes + _BATCH_OVERHEAD),
        }
        if min_insync_replicas is not None:
            config["min.insync.replicas"] = str(min_insync_replicas)
        left = self._left(deadline)
        futures = admin.create_topics(
            [
                NewTopic(
                    self.topic,
                    num_partitions=1,
                    replication_factor=replication_factor,
                    config=config,
                )
            ],
            request_timeout=left,
            operation_timeout=left,
        )
        try:
            futures[self.topic].result(timeout=left + 1)
        except KafkaException as exc:
            err = exc.args[0]
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return  # another process created it first
            raise self._unavailable(f"cannot create topic {self.topic}", exc) from exc
        except FutureTimeout as exc:
            raise self._unavailable(f"cannot create topic {self.topic}", exc) from exc
        log.info("created Kafka topic %s on %s", self.topic, self.bootstrap)

    def _client(self, kind: Callable[[dict[str, Any]], _C], config: dict[str, Any]) -> _C:
        """Make a librdkafka client; a setting it refuses is the URL's fault, not the broker's."""
        try:
            return kind({**self._common, **config})
        except (KafkaException, ValueError, TypeError) as exc:
            raise JournalConfigError(
                f"invalid Kafka client settings for {self.topic}: {exc}"
            ) from exc

    def _new_consumer(self) -> Consumer:
        return self._client(
            Consumer,
            {
                # A group id is required by the client, but the log never joins
                # the group nor commits: it assigns the partition by hand.
                "group.id": f"tidefs-reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                # The broker answers a tail fetch as soon as a record lands; this
                # only bounds an idle fetch, and so how fast a re-assign is seen.
                # Not shorter: after each idle answer the next fetch spends a round
                # trip on the way, and a record landing meanwhile waits for it.
                # Measured across a 30 ms link at 5 records/s: 100 ms made the
                # median fetch-and-fold 88 ms, 500 ms 38 ms. The price: a pooled
                # reader moved to another offset may wait up to this long for its
                # parked fetch to come back (followers never move).
                "fetch.wait.max.ms": 500,
                "fetch.error.backoff.ms": 20,
            },
        )

    # -- appending -----------------------------------------------------------

    def append(self, payload: bytes, timestamp_ns: int | None = None) -> int:
        """Produce one record and return its offset once every in-sync replica has it."""
        return self._delivered(self._produce(*self._checked(payload, timestamp_ns)))

    def append_many(self, entries: Sequence[tuple[bytes, int | None]]) -> list[int]:
        """Produce records in this order, then wait for all their deliveries at once.

        One partition and the idempotent producer keep them in this order;
        librdkafka sends them in one or a few produce requests. Every record
        is checked before any is produced, so a record that is refused (too
        large, not bytes) lands none of the batch. Should producing fail
        partway (the queue stays full, the producer fails), the records
        already handed over may still land: this waits for them and raises
        JournalUnavailable, and the caller retries the whole batch (with
        the same request ids, which the fold applies once).
        """
        checked = [self._checked(payload, timestamp_ns) for payload, timestamp_ns in entries]
        self._check_open()
        deliveries: list[_Delivery] = []
        try:
            for data, timestamp_ns in checked:
                deliveries.append(self._produce(data, timestamp_ns))
        except (JournalError, KafkaException) as exc:
            deadline = time.monotonic() + self.timeout + 1.0
            for delivery in deliveries:  # let what was handed over land (or fail) first
                delivery.done.wait(max(0.0, deadline - time.monotonic()))
            raise JournalUnavailable(
                f"append of {len(checked)} records to {self.topic} failed after "
                f"{len(deliveries)} were produced (they may be written): {exc}"
            ) from exc
        return [self._delivered(delivery) for delivery in deliveries]

    def _checked(self, payload: bytes, timestamp_ns: int | None) -> tuple[bytes, int]:
        """Check one record before it is produced; return its bytes and timestamp."""
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"a record payload must be bytes, not {type(payload).__name__}")
        data = bytes(payload)
        if len(data) > self.max_record_bytes:
            raise JournalError(
                f"record of {len(data)} bytes exceeds max_record_bytes={self.max_record_bytes}"
            )
        if timestamp_ns is None:
            timestamp_ns = time.time_ns()
        elif timestamp_ns < 0:
            raise ValueError(
                f"timestamp_ns must be nanoseconds since the epoch, not {timestamp_ns}"
            )
        return data, timestamp_ns

    def _produce(self, data: bytes, timestamp_ns: int) -> _Delivery:
        """Hand one checked record to the producer; return what its delivery report will fill in."""
        self._check_open()
        delivery = _Delivery()
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value=data,
                    partition=0,
                    # 0 would mean "now" to librdkafka; the header keeps the exact value anyway.
                    timestamp=max(1, timestamp_ns // 1_000_000),
                    headers=[(TIMESTAMP_HEADER, timestamp_ns.to_bytes(8, "big"))],
                    on_delivery=delivery,
                )
                return delivery
            except BufferError:
                # The local queue is full: the poller is draining it; wait, but not forever.
                if time.monotonic() >= deadline:
                    raise JournalUnavailable(
                        f"Kafka producer queue for {self.topic} stayed full for {self.timeout}s"
                    ) from None
                time.sleep(0.005)
            except KafkaException as exc:
                raise self._unavailable(f"cannot append to {self.topic}", exc) from exc

    def _delivered(self, delivery: _Delivery) -> int:
        """Wait for a produced record's delivery report; return its offset."""
        # librdkafka fails a message after message.timeout.ms, so the report
        # comes within `timeout`; the extra second only covers a stalled poller.
        if not delivery.done.wait(self.timeout + 1.0):
            raise JournalUnavailable(
                f"no delivery report for an append to {self.topic} within {self.timeout}s "
                "(the record may still be written)"
            )
        if delivery.error is not None:
            raise JournalUnavailable(
                f"append to {self.topic} on {self.bootstrap} failed: {delivery.error}"
                + (f" (last client error: {self._last_error})" if self._last_error else "")
            )
        return delivery.offset

    def _poll_producer(self) -> None:
        """Serve delivery reports as they arrive (the reports run the appenders' callbacks)."""
        while not self._stop.is_set():
            self._producer.poll(0.05)

    # -- reading -------------------------------------------------------------

    def read(self, start: int, max_records: int = 1000, timeout: float = 0.0) -> list[Record]:
        """Return up to `max_records` records from `start` on, waiting up to `timeout` for one.

        Records below the high watermark are fetched even when `timeout` is 0:
        a reader asking for records that exist must get them, however long the
        fetch takes (within the backend's `timeout`).
        """
        if start < 0:
            raise ValueError(f"start offset must be >= 0, not {start}")
        if max_records <= 0:
            return []
        if timeout > 0 and self._tail_interval > 0:
            records = self._read_tail(start, max_records, timeout)
            if records is not None:
                return records
        reader = self._borrow(start)
        try:
            return self._read_with(reader, start, max_records, max(0.0, timeout))
        except KafkaException as exc:
            reader.position = None  # unknown after a failure: re-assign next time
            raise self._unavailable(f"cannot read {self.topic}", exc) from exc
        finally:
            self._give_back(reader)

    def _read_with(
        self, reader: _Reader, start: int, max_records: int, timeout: float
    ) -> list[Record]:
        consumer = reader.consumer
        tail_deadline = time.monotonic() + timeout
        if reader.position != start:
            # Never fetch beyond the log end: Kafka would answer "out of range"
            # and reset the position. Start at the end and skip up to `start`.
            # Nor below the start: the reset would skip the deleted records.
            low, high = self._watermarks(time.monotonic() + self.timeout)
            if start < low:
                raise LogTrimmed(self.volume, low, start)
            fetch_from = min(start, high)
            consumer.assign([TopicPartition(self.topic, 0, fetch_from)])
            reader.position = fetch_from
        # Once records at or after `start` are known to exist, the wait is for
        # the fetch, bounded by the backend timeout rather than the caller's.
        data_deadline: float | None = None
        if start < self._known_head:
            data_deadline = max(tail_deadline, time.monotonic() + self.timeout)
        while True:
            deadline = tail_deadline if data_deadline is None else data_deadline
            message = consumer.poll(max(0.0, deadline - time.monotonic()))
            if message is not None:
                records = self._take(reader, message, start, max_records)
                if records:
                    return records
                continue
            now = time.monotonic()
            if data_deadline is None:
                # The caller's wait is over: are there records not fetched yet?
                if self._watermark(now + self.timeout) <= start:
                    return []
                data_deadline = now + self.timeout
            elif now >= data_deadline:
                # The watermark says records exist but none arrived: either only
                # control records are left, or the broker went away.
                position = consumer.position([TopicPartition(self.topic, 0)])[0].offset
                if position >= self._watermark(now + self.timeout):
                    return []
                raise JournalUnavailable(
                    f"records of {self.topic} from offset {start} could not be fetched from "
                    f"{self.bootstrap} within {self.timeout}s"
                )

    def _read_tail(self, start: int, max_records: int, timeout: float) -> list[Record] | None:
        """Read at the tail through the tail fetcher; None: read through librdkafka instead."""
        tail = self._tail_at(start)
        if tail is None:
            return None
        called = time.monotonic()
        records = tail.take(start, max_records, timeout)
        if records == []:
            # The caller's wait is over: are there records not fetched yet? They
            # must be returned. The fetcher's own answers usually tell (asking
            # the broker costs a round trip, during which a record that lands
            # would wait). A fetcher that does not bring records that exist
            # within moments is stuck (say, on a link that dropped its
            # requests): librdkafka fetches them instead.
            end = tail.end_since(called)
            if end is None:
                end = self._watermark(time.monotonic() + self.timeout)
            if end <= start:
                return []
            records = tail.take(start, max_records, min(self.timeout, _TAIL_OVERDUE))
            if records == []:
                self._drop_tail(tail, "records the log holds did not come")
        if not records:
            if tail.failure is not None:
                self._drop_tail(tail, tail.failure)
            return None  # stopped, or `start` left the window: this read only goes elsewhere
        self._known_head = max(self._known_head, records[-1].offset + 1)
        return records

    def _tail_at(self, start: int) -> TailFetcher | None:
        """The tail fetcher that serves `start`, started if this reader is near the head.

        The broker is asked (watermark, leader) outside the lock and with a
        short bound: a reader must not wait on another's request to a broker
        that went away; its own read then reports that.
        """
        stale: TailFetcher | None = None
        with self._tail_lock:
            self._check_open()
            tail = self._tail
            if tail is not None and tail.failure is None:
                if tail.covers(start):
                    return tail
                if tail.in_use(_TAIL_ABANDONED):
                    return None  # it serves other readers, further on
            if tail is not None:
                self._tail, stale = None, tail
                if tail.failure is not None:
                    self._tail_retry = time.monotonic() + _TAIL_RETRY
            if time.monotonic() < self._tail_retry or self._tail_interval == 0:
                fresh = False
            else:
                fresh = True
                self._tail_retry = time.monotonic() + 1.0  # one attempt a second at most
        if stale is not None:
            if stale.failure is not None:
                self._drop_tail(stale, stale.failure)
            else:
                stale.close()
        if not fresh:
            return None
        try:
            deadline = time.monotonic() + min(self.timeout, 1.0)
            if start < self._watermark(deadline) - _TAIL_CATCH_UP:
                return None  # far behind: librdkafka catches up faster; asked again in a while
            address = self._leader_address(deadline)
        except JournalError as exc:
            log.info("no tail fetcher for %s: %s", self.topic, exc)
            with self._tail_lock:
                self._tail_retry = time.monotonic() + _TAIL_RETRY
            return None
        tail = TailFetcher(
            address,
            self.topic,
            start,
            timestamp_header=TIMESTAMP_HEADER,
            interval=self._tail_interval,
            max_connections=self._tail_connections,
            max_bytes=self.max_record_bytes + _BATCH_OVERHEAD,
            connect_timeout=self.timeout,
            client_id=f"tidefs-{self.volume}-tail",
        )
        with self._tail_lock:
            if self._closed or self._tail is not None:
                stale, tail = tail, None  # closed meanwhile, or another reader started one
            else:
                self._tail = tail
                stale = None
        if stale is not None:
            stale.close()
        return tail

    def _drop_tail(self, tail: TailFetcher, why: str) -> None:
        """Stop `tail` for every reader; one is tried again after a while."""
        self.tail_failure = why
        with self._tail_lock:
            if self._tail is tail:
                self._tail = None
            self._tail_retry = time.monotonic() + _TAIL_RETRY
            if tail.unsupported and self._tail_interval:
                log.warning(
                    "reading the tail of %s through librdkafka from now on: %s", self.topic, why
                )
                self._tail_interval = 0.0
        tail.close()

    def _leader_address(self, deadline: float) -> tuple[str, int]:
        """(host, port) of the partition leader, from the cluster's metadata."""
        with self._meta_lock:
            metadata = self._call(
                lambda left: self._meta.list_topics(self.topic, timeout=left), "metadata", deadline
            )
        topic = metadata.topics.get(self.topic)
        partition = topic.partitions.get(0) if topic is not None else None
        broker = metadata.brokers.get(partition.leader) if partition is not None else None
        if broker is None:
            raise JournalUnavailable(f"no leader known for {self.topic}")
        return str(broker.host), int(broker.port)

    def _take(self, reader: _Reader, first: Message, start: int, max_records: int) -> list[Record]:
        """Turn `first` and whatever else is already fetched into records at or after `start`."""
        batch = [first]
        if max_records > 1:
            batch += reader.consumer.consume(max_records - 1, 0)
        records: list[Record] = []
        for message in batch:
            record = self._record(message)
            if record is None:
                continue
            if not records and record.offset > start:
                self._check_not_trimmed(reader, start)
            reader.position = record.offset + 1
            self._known_head = max(self._known_head, record.offset + 1)
            if record.offset >= start:
                records.append(record)
        return records

    def _check_not_trimmed(self, reader: _Reader, start: int) -> None:
        """Raise LogTrimmed if records from `start` on were deleted under a positioned reader.

        A gap after `start` is either one Kafka may leave, or the consumer's
        reset to the low watermark after a trim: only the watermark tells.
        """
        low = self._watermarks(time.monotonic() + self.timeout)[0]
        if start < low:
            reader.position = None
            raise LogTrimmed(self.volume, low, start)

    def _record(self, msg: Message) -> Record | None:
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return None
            raise KafkaException(err)
        offset = msg.offset()
        if offset is None:  # pragma: no cover - fetched messages always carry one
            return None
        timestamp_ns = msg.timestamp()[1] * 1_000_000
        headers = msg.headers() or ()
        for key, value in headers.items() if isinstance(headers, dict) else headers:
            if key == TIMESTAMP_HEADER and isinstance(value, bytes) and len(value) == 8:
                timestamp_ns = int.from_bytes(value, "big")
        return Record(offset, timestamp_ns, msg.value() or b"")

    def _borrow(self, start: int) -> _Reader:
        """Take an idle reader, preferring one already positioned at `start`."""
        with self._readers_cond:
            while True:
                self._check_open()
                for reader in self._idle:
                    if reader.position == start:
                        self._idle.remove(reader)
                        return reader
                if len(self._readers) < self._max_readers:
                    break
                if self._idle:
                    return self._idle.pop(0)
                self._readers_cond.wait()
            reader = _Reader(self._new_consumer())
            self._readers.append(reader)
            return reader

    def _give_back(self, reader: _Reader) -> None:
        with self._readers_cond:
            if self._closed:
                self._readers.remove(reader)
                reader.consumer.close()
            else:
                self._idle.append(reader)
            self._readers_cond.notify()

    # -- positions -----------------------------------------------------------

    def head(self) -> int:
        """Return the high watermark: the offset after the last committed record."""
        self._check_open()
        return self._watermark(time.monotonic() + self.timeout)

    def start(self) -> int:
        """Return the low watermark: the first offset still stored (0 unless trimmed)."""
        self._check_open()
        return self._watermarks(time.monotonic() + self.timeout)[0]

    def _watermark(self, deadline: float) -> int:
        return self._watermarks(deadline)[1]

    def _watermarks(self, deadline: float) -> tuple[int, int]:
        """Return (low, high) watermarks, asked of the partition leader now."""
        with self._meta_lock:
            result = self._call(
                lambda left: self._meta.get_watermark_offsets(self._tp, timeout=left, cached=False),
                "head",
                deadline,
            )
        if result is None:
            raise JournalUnavailable(
                f"no watermarks for {self.topic} from {self.bootstrap} within {self.timeout}s"
            )
        low, high = int(result[0]), int(result[1])
        self._known_head = max(self._known_head, high)
        return max(0, low), high

    def offset_for_time(self, timestamp_ns: int) -> int:
        """Return the first offset whose append time is >= `timestamp_ns` (head() if none)."""
        self._check_open()
        millis = max(0, timestamp_ns // 1_000_000)
        deadline = time.monotonic() + self.timeout
        with self._meta_lock:
            (found,) = self._call(
                lambda left: self._meta.offsets_for_times(
                    [TopicPartition(self.topic, 0, millis)], timeout=left
                ),
                "offset_for_time",
                deadline,
            )
        if found.error is not None:
            raise JournalUnavailable(f"offset_for_time on {self.topic} failed: {found.error}")
        if found.offset < 0:
            return self.head()
        # Kafka answered for the millisecond; the records of that millisecond
        # that are older than `timestamp_ns` are skipped by their exact time.
        position = found.offset
        while True:
            records = self.read(position, max_records=100)
            if not records:
                return self.head()
            for record in records:
                if record.timestamp_ns >= timestamp_ns:
                    return record.offset
            position = records[-1].offset + 1

    # -- errors and closing --------------------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        # librdkafka reports transport trouble here and keeps retrying by
        # itself; the latest one makes a time-out's message say why.
        self._last_error = str(err)
        log.debug("kafka client error on %s: %s", self.topic, err)

    def _call(self, fn: Callable[[float], Any], what: str, deadline: float) -> Any:
        """Run `fn(seconds_left)` until it answers or `deadline` passes.

        A fresh topic's leader, or a restarted broker, answers with retriable
        errors for a moment; only the deadline turns them into JournalUnavailable.
        """
        while True:
            try:
                return fn(self._left(deadline))
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                fatal = isinstance(err, KafkaError) and err.fatal()
                if fatal or time.monotonic() + 0.05 >= deadline:
                    raise self._unavailable(f"{what} on {self.topic}", exc) from exc
                time.sleep(0.05)

    def _unavailable(self, what: str, exc: BaseException) -> JournalUnavailable:
        detail = str(exc.args[0]) if exc.args else type(exc).__name__
        if self._last_error and self._last_error not in detail:
            detail += f"; last client error: {self._last_error}"
        return JournalUnavailable(
            f"{what}: Kafka brokers {self.bootstrap} unavailable within {self.timeout}s ({detail})"
        )

    def _left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise JournalUnavailable(
                f"Kafka brokers {self.bootstrap} did not answer within {self.timeout}s"
                + (f" ({self._last_error})" if self._last_error else "")
            )
        return left

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError(f"the log of volume {self.volume!r} ({self.topic}) is closed")

    def close(self) -> None:
        """Wait (up to `timeout`) for appends in flight, then release the clients."""
        with self._readers_cond:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
            for reader in idle:
                self._readers.remove(reader)
            self._readers_cond.notify_all()
        with self._tail_lock:
            tail, self._tail = self._tail, None
        if tail is not None:
            tail.close()
        remaining = self._producer.flush(self.timeout)
        if remaining:
            log.warning("%d append(s) to %s undelivered at close", remaining, self.topic)
        self._stop.set()
        self._poller.join()
        for reader in idle:
            reader.consumer.close()
        with self._meta_lock:
            self._meta.close()

    def __repr__(self) -> str:
        return f"KafkaLog({self.bootstrap!r}, volume={self.volume!r})"


class _Reader:
    """A consumer of the log's partition and where it stands (None: not assigned)."""

    __slots__ = ("consumer", "position")

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.position: int | None = None


class _Delivery:
    """The delivery callback of one append, and what it reported."""

    __slots__ = ("done", "error", "offset")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: KafkaError | None = None
        self.offset = -1

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.error = err
        else:
            offset = msg.offset()
            if offset is None or offset < 0:
                self.error = KafkaError(KafkaError._FAIL, "delivery report without an offset")
            else:
                self.offset = offset
        self.done.set()


def _non_negative_float(value: object) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not number >= 0:
        raise ValueError("must be >= 0")
    return number


def _int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    return int(value)  # type: ignore[call-overload]
