"""Every metric and span name of tidefs, and how they leave the process.

Every layer records through the instruments defined here (the replica: apply
delay, append latency and the submit span; the mount: FUSE, cache and store
figures), so that a name is written once and the Grafana dashboard and the
tests refer to the same table. Names follow OpenTelemetry conventions
(`tidefs.<area>.<what>`, a unit on every instrument); the Prometheus names a
scrape shows are derived from them by `prometheus_name`, the one place that
knows the exporter's rules (`tidefs.apply.delay` in `s` is scraped as
`tidefs_apply_delay_seconds`, counters get `_total`).

Every data point carries the attributes `volume` and `region` (set once per
process by `configure`), plus its own (`op`, `errno`, `level`, ...).

The instruments are created against the global meter and tracer providers,
which are no-ops until `start_exporters` installs real ones: code records
unconditionally, and a process without `--metrics-port` (or `--metrics-addr`) or
`OTEL_EXPORTER_OTLP_ENDPOINT` pays almost nothing.

What "lag" means here: the records appended to the volume's log that this
region has not applied yet (`head - 1 - applied`; a Kafka log may hold a few
transaction markers that are counted too), and in seconds, how long ago the
oldest of them was appended. A region that has applied everything has lag 0
however old the last write is.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

if TYPE_CHECKING:
    from tidefs.journal.log import Log

log = logging.getLogger(__name__)

OTLP_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
"""When this variable is set, metrics and traces are also pushed over OTLP/HTTP to it."""

SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
"""Histogram bounds of every duration: sub-millisecond appends up to minutes of apply delay."""


@dataclass(frozen=True, slots=True)
class Metric:
    """One instrument: its OpenTelemetry name, kind, unit and meaning."""

    name: str
    kind: str
    """counter, histogram or gauge (counters and gauges may be observable)."""
    unit: str
    description: str

    @property
    def prometheus(self) -> str:
        """The name a Prometheus scrape shows (histograms add _bucket, _sum, _count)."""
        return prometheus_name(self)


def prometheus_name(metric: Metric) -> str:
    """Derive the Prometheus name the OpenTelemetry exporter gives `metric`."""
    from opentelemetry.exporter.prometheus._mapping import map_unit, sanitize_full_name

    name = sanitize_full_name(metric.name)
    unit = map_unit(metric.unit)
    if unit and not name.endswith("_" + unit):
        name += "_" + unit
    if metric.kind == "counter":
        name += "_total"
    return name


# -- the table -----------------------------------------------------------------

APPLIED_OFFSET = Metric(
    "tidefs.region.applied_offset", "gauge", "{offset}", "the last log offset this region applied"
)
LAG_RECORDS = Metric(
    "tidefs.region.lag.records",
    "gauge",
    "{record}",
    "records appended to the log that this region has not applied",
)
LAG_SECONDS = Metric(
    "tidefs.region.lag",
    "gauge",
    "s",
    "how long ago the oldest record this region has not applied was appended (0 when caught up)",
)
APPLY_DELAY = Metric(
    "tidefs.apply.delay",
    "histogram",
    "s",
    "from the writer's timestamp of a record to its fold in this region",
)
APPEND_DURATION = Metric(
    "tidefs.journal.append.duration",
    "histogram",
    "s",
    "latency of one durable append to the log: one command, or a mount's batch of them",
)
BACKLOG_BLOCKS = Metric(
    "tidefs.replicator.backlog.blocks", "gauge", "{block}", "blocks not yet copied to this region"
)
BACKLOG_BYTES = Metric(
    "tidefs.replicator.backlog.size", "gauge", "By", "bytes of the blocks not yet copied here"
)
BACKLOG_AGE = Metric(
    "tidefs.replicator.backlog.age",
    "gauge",
    "s",
    "age of the oldest block not yet copied here (since its command was appended)",
)
BLOCKS_COPIED = Metric(
    "tidefs.replicator.copied.blocks",
    "counter",
    "{block}",
    "blocks the replicator copied here from other regions",
)
BYTES_COPIED = Metric(
    "tidefs.replicator.copied.size", "counter", "By", "bytes the replicator copied here"
)
FALLBACK_READS = Metric(
    "tidefs.fetch.fallback.reads",
    "counter",
    "{block}",
    "blocks read from another region's store because they were not here yet",
)
FALLBACK_BYTES = Metric(
    "tidefs.fetch.fallback.size", "counter", "By", "bytes read from another region's store"
)
LOCAL_READS = Metric(
    "tidefs.fetch.local.reads", "counter", "{block}", "blocks read from this region's store"
)
CORRUPT_BLOCKS = Metric(
    "tidefs.fetch.corrupt", "counter", "{block}", "block copies that failed verification"
)
STORE_UNAVAILABLE = Metric(
    "tidefs.fetch.unavailable",
    "counter",
    "{call}",
    "store calls that timed out or found their store unreachable",
)
CACHE_HITS = Metric(
    "tidefs.cache.hits", "counter", "{block}", "block reads served by a cache, by level"
)
CACHE_MISSES = Metric(
    "tidefs.cache.misses", "counter", "{block}", "block reads that no cache could serve"
)
FUSE_DURATION = Metric(
    "tidefs.fuse.operation.duration", "histogram", "s", "latency of FUSE operations, by op"
)
FUSE_ERRORS = Metric(
    "tidefs.fuse.errors", "counter", "{error}", "FUSE operations that failed, by op and errno"
)
BLOCKS_UPLOADED = Metric(
    "tidefs.store.uploaded.blocks", "counter", "{block}", "blocks written to this region's store"
)
BYTES_UPLOADED = Metric(
    "tidefs.store.uploaded.size", "counter", "By", "bytes written to this region's store"
)
SLICES_COMMITTED = Metric(
    "tidefs.data.slices", "counter", "{slice}", "CommitSlice commands applied for this mount"
)
COMPACTIONS = Metric(
    "tidefs.data.compactions", "counter", "{compaction}", "chunk compactions, by result"
)

ALL: tuple[Metric, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Metric))
"""Every instrument tidefs defines."""

REGION_METRICS: tuple[Metric, ...] = (
    APPLIED_OFFSET,
    LAG_RECORDS,
    LAG_SECONDS,
    APPLY_DELAY,
    APPEND_DURATION,
    BACKLOG_BLOCKS,
    BACKLOG_BYTES,
    BACKLOG_AGE,
    BLOCKS_COPIED,
    BYTES_COPIED,
    FALLBACK_READS,
    FALLBACK_BYTES,
    CACHE_HITS,
    CACHE_MISSES,
    FUSE_DURATION,
    FUSE_ERRORS,
)
"""What a mount with a replicator exports once it has served a few calls (the issue's list)."""

SPAN_SUBMIT = "tidefs.submit"
"""The span of one append: append to the log, then wait for this region to apply it.

One command (`tidefs.command` names its type), or a mount committer's batch
of commands, whose callers share one span (`tidefs.command` names their type
if they have one, else it is "batch")."""
ATTR_OFFSET = "tidefs.log.offset"
ATTR_COMMAND = "tidefs.command"

# -- the instruments -----------------------------------------------------------

_meter = metrics.get_meter("tidefs")
tracer = trace.get_tracer("tidefs")
"""The tracer of every tidefs span."""


def _histogram(m: Metric) -> metrics.Histogram:
    return _meter.create_histogram(
        m.name,
        unit=m.unit,
        description=m.description,
        explicit_bucket_boundaries_advisory=list(SECONDS_BUCKETS) if m.unit == "s" else None,
    )


def _counter(m: Metric) -> metrics.Counter:
    return _meter.create_counter(m.name, unit=m.unit, description=m.description)


apply_delay = _histogram(APPLY_DELAY)
append_duration = _histogram(APPEND_DURATION)
fuse_duration = _histogram(FUSE_DURATION)
fuse_errors = _counter(FUSE_ERRORS)
cache_hits = _counter(CACHE_HITS)
cache_misses = _counter(CACHE_MISSES)
blocks_uploaded = _counter(BLOCKS_UPLOADED)
bytes_uploaded = _counter(BYTES_UPLOADED)
slices_committed = _counter(SLICES_COMMITTED)
compactions = _counter(COMPACTIONS)

_base: dict[str, str] = {}


def configure(volume: str, region: str) -> None:
    """Set the `volume` and `region` attributes of every data point of this process."""
    _base.update(volume=volume, region=region)


def attrs(**extra: Any) -> dict[str, Any]:
    """The attributes of a data point: this process's volume and region, plus `extra`."""
    return {**_base, **extra} if extra else dict(_base)


# -- apply delay, kept for status reports ----------------------------------------


class DelayWindow:
    """The most recent apply delays of a region, for the p99 of `tidefs status` and `top`."""

    def __init__(self, size: int = 2048) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, seconds: Iterable[float]) -> None:
        with self._lock:
            self._values.extend(seconds)

    def p99(self) -> float:
        """The 99th percentile of the window (0.0 when empty)."""
        with self._lock:
            values = sorted(self._values)
        if not values:
            return 0.0
        return values[min(len(values) - 1, int(len(values) * 0.99))]


APPLY_SAMPLES_PER_BATCH = 32
"""At most this many records of one folded batch enter the apply delay histogram.

A histogram record costs tens of microseconds in the Python SDK, as much as
folding a record: a region catching up on thousands of records samples them
evenly; in steady state (small batches) every record is recorded.
"""


def record_apply(timestamps_ns: Sequence[int], window: DelayWindow | None = None) -> None:
    """Record the apply delay of records appended at `timestamps_ns`, applied now."""
    now = time.time_ns()
    delays = [max(0.0, (now - ts) / 1e9) for ts in timestamps_ns]
    a = attrs()
    step = -(-len(delays) // APPLY_SAMPLES_PER_BATCH)  # ceil: at most the cap
    for d in delays[::step] if delays else ():
        apply_delay.record(d, a)
    if window is not None:
        window.add(delays)


# -- region figures, read at each collection ------------------------------------


def measure_lag(log_: Log, applied: int) -> tuple[int, float]:
    """Return (records, seconds) this region is behind the log's head after `applied`."""
    head = log_.head()
    behind = max(0, head - 1 - applied)
    if not behind:
        return 0, 0.0
    first = log_.read(applied + 1, max_records=1, timeout=0.0)
    if not first:
        return behind, 0.0
    return behind, max(0.0, (time.time_ns() - first[0].timestamp_ns) / 1e9)


@dataclass
class RegionSources:
    """Where a process's region figures come from; any part may be missing."""

    log: Log | None = None
    applied: Callable[[], int] | None = None
    fetch_stats: Callable[[], Any] | None = None
    replicator: Any = None
    """A replica.replicator.Replicator (backlog() and stats())."""


_sources = RegionSources()
_observing = False


def observe_region(sources: RegionSources) -> None:
    """Export this region's offset, lag, backlog and fetch counters from `sources`.

    The observable instruments are registered once per process; a later call
    replaces the sources they read.
    """
    global _sources, _observing
    _sources = sources
    if _observing:
        return
    _observing = True

    def lag_pair() -> tuple[int, float] | None:
        # Measured afresh by each gauge: a cached pair could show a scrape the
        # lag of the one before (a head() and a one-record read are cheap).
        s = _sources
        if s.log is None or s.applied is None:
            return None
        return measure_lag(s.log, s.applied())

    def gauge(m: Metric, read: Callable[[], float | None]) -> None:
        def callback(_options: CallbackOptions) -> list[Observation]:
            try:
                value = read()
            except Exception as exc:  # a journal hiccup must not break the scrape
                log.debug("cannot read %s: %s", m.name, exc)
                return []
            return [] if value is None else [Observation(value, attrs())]

        if m.kind == "counter":
            _meter.create_observable_counter(
                m.name, callbacks=[callback], unit=m.unit, description=m.description
            )
        else:
            _meter.create_observable_gauge(
                m.name, callbacks=[callback], unit=m.unit, description=m.description
            )

    def applied() -> int | None:
        return None if _sources.applied is None else _sources.applied()

    def lag_records() -> int | None:
        pair = lag_pair()
        return None if pair is None else pair[0]

    def lag_seconds() -> float | None:
        pair = lag_pair()
        return None if pair is None else pair[1]

    def backlog(field: str) -> Callable[[], float | None]:
        def read() -> float | None:
            r = _sources.replicator
            return None if r is None else getattr(r.backlog(), field)

        return read

    def copied(field: str) -> Callable[[], float | None]:
        def read() -> float | None:
            r = _sources.replicator
            return None if r is None else getattr(r.stats(), field)

        return read

    def fetched(field: str) -> Callable[[], float | None]:
        def read() -> float | None:
            f = _sources.fetch_stats
            return None if f is None else getattr(f(), field)

        return read

    gauge(APPLIED_OFFSET, applied)
    gauge(LAG_RECORDS, lag_records)
    gauge(LAG_SECONDS, lag_seconds)
    gauge(BACKLOG_BLOCKS, backlog("blocks"))
    gauge(BACKLOG_BYTES, backlog("bytes"))
    gauge(BACKLOG_AGE, backlog("oldest_age_s"))
    gauge(BLOCKS_COPIED, copied("blocks_copied"))
    gauge(BYTES_COPIED, copied("bytes_copied"))
    gauge(FALLBACK_READS, fetched("fallback_reads"))
    gauge(FALLBACK_BYTES, fetched("fallback_bytes"))
    gauge(LOCAL_READS, fetched("local_reads"))
    gauge(CORRUPT_BLOCKS, fetched("corrupt_copies"))
    gauge(STORE_UNAVAILABLE, fetched("unavailable"))


# -- export --------------------------------------------------------------------

_shutdown: list[Callable[[], object]] = []


DEFAULT_METRICS_HOST = "127.0.0.1"
"""Where `--metrics-port` serves: this machine only; `--metrics-addr` exposes it on purpose."""


def parse_metrics_addr(text: str) -> tuple[str, int]:
    """Parse `HOST:PORT` (`[V6]:PORT` for IPv6; `0.0.0.0:P` is every interface).

    Raises ValueError with a message fit for a usage error.
    """
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected HOST:PORT with a port from 1 to 65535, not {text!r}")
    return host, int(port_text)


def start_exporters(port: int | None, *, host: str = DEFAULT_METRICS_HOST) -> bool:
    """Install the meter (and tracer) providers: Prometheus on `port`, OTLP when configured.

    Prometheus is served on `host` only (loopback unless told). OTLP/HTTP
    is used when OTEL_EXPORTER_OTLP_ENDPOINT is set (the standard OTEL_*
    variables tune it, e.g. OTEL_METRIC_EXPORT_INTERVAL in ms). Returns
    whether anything was installed. Raises OSError if the port is taken.
    """
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource

    readers: list[MetricReader] = []
    if port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(port, addr=host)
        readers.append(PrometheusMetricReader())
        log.info("serving metrics on %s port %d", host, port)
    otlp = bool(os.environ.get(OTLP_ENV))
    resource = Resource.create(
        {"service.name": "tidefs", **{f"tidefs.{k}": v for k, v in _base.items()}}
    )
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
        _shutdown.append(tracer_provider.shutdown)
        log.info("exporting metrics and traces over OTLP to %s", os.environ[OTLP_ENV])
    if not readers:
        return False
    # No exemplars: they cost a third of every recording and nothing links to them.
    provider = MeterProvider(
        metric_readers=readers, resource=resource, exemplar_filter=AlwaysOffExemplarFilter()
    )
    metrics.set_meter_provider(provider)
    _shutdown.append(provider.shutdown)
    # Series that exist from the start, so that a rate over them is defined at 0.
    for level in ("memory", "disk"):
        cache_hits.add(0, attrs(level=level))
    cache_misses.add(0, attrs())
    return True


def shutdown() -> None:
    """Flush and stop the exporters (the last OTLP batch is sent here)."""
    while _shutdown:
        fn = _shutdown.pop()
        try:
            fn()
        except Exception as exc:
            log.warning("telemetry shutdown: %s", exc)
