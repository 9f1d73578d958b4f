"""Metrics of a mount, all named here (OpenTelemetry API; exported when a port is given).

The instruments are created against the global meter provider, which is a
no-op until `serve_prometheus` installs a real one, so that code paths record
unconditionally and a mount without `--metrics-port` pays almost nothing.
"""

from __future__ import annotations

import logging

from opentelemetry import metrics

log = logging.getLogger(__name__)

_meter = metrics.get_meter("tidefs.fs")

FUSE_OP_LATENCY = _meter.create_histogram(
    "tidefs_fuse_op_seconds", unit="s", description="latency of FUSE operations, by operation"
)
FALLBACK_READS = _meter.create_counter(
    "tidefs_fallback_reads", description="blocks read from another region's store"
)
FALLBACK_BYTES = _meter.create_counter(
    "tidefs_fallback_read_bytes", unit="By", description="bytes read from another region's store"
)
CORRUPT_BLOCKS = _meter.create_counter(
    "tidefs_corrupt_blocks", description="block copies that failed checksum verification"
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


def serve_prometheus(port: int) -> None:
    """Install a meter provider that Prometheus scrapes on `port` (all interfaces)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    start_http_server(port)
    metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
    log.info("serving metrics on port %d", port)
