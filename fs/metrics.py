"""Metrics of a mount, all named here (OpenTelemetry API; exported when a port is given).

The instruments are created against the global meter provider, which is a
no-op until `serve_prometheus` installs a real one, so that code paths record
unconditionally and a mount without `--metrics-port` pays almost nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

log = logging.getLogger(__name__)

_meter = metrics.get_meter("tidefs.fs")

FUSE_OP_LATENCY = _meter.create_histogram(
    "tidefs_fuse_op_seconds", unit="s", description="latency of FUSE operations, by operation"
)
CACHE_HITS = _meter.create_counter(
    "tidefs_block_cache_hits", description="block reads served by a cache, by level"
)
BLOCKS_UPLOADED = _meter.create_counter(
    "tidefs_blocks_uploaded", description="blocks written to the local region's store"
)
BYTES_UPLOADED = _meter.create_counter(
    "tidefs_bytes_uploaded", unit="By", description="bytes written to the local region's store"
)
SLICES_COMMITTED = _meter.create_counter(
    "tidefs_slices_committed", description="CommitSlice commands applied for this mount"
)
COMPACTIONS = _meter.create_counter(
    "tidefs_compactions", description="chunk compactions attempted, by result"
)


FETCH_COUNTERS = {
    "fallback_reads": ("tidefs_fallback_reads", "blocks read from another region's store"),
    "fallback_bytes": ("tidefs_fallback_read_bytes", "bytes read from another region's store"),
    "corrupt_copies": ("tidefs_corrupt_blocks", "block copies that failed verification"),
    "unavailable": ("tidefs_store_unavailable", "store calls that timed out or found no store"),
    "local_reads": ("tidefs_local_block_reads", "blocks read from the local region's store"),
}
"""The block fetcher's counters, exported under these names (field -> name, description)."""


def observe_fetcher(stats: Callable[[], Any]) -> None:
    """Export the block fetcher's counters (read from `stats()` at each collection)."""
    for field, (name, description) in FETCH_COUNTERS.items():

        def callback(_options: CallbackOptions, field: str = field) -> list[Observation]:
            return [Observation(getattr(stats(), field))]

        _meter.create_observable_counter(name, callbacks=[callback], description=description)


def serve_prometheus(port: int) -> None:
    """Install a meter provider that Prometheus scrapes on `port` (all interfaces)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    start_http_server(port)
    metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
    log.info("serving metrics on port %d", port)
