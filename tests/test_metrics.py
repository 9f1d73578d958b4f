"""Metrics of a running two-region setup, scraped as Prometheus scrapes them, and OTLP export.

Two real FUSE mounts (regions a and b) of one volume serve `--metrics-port`.
Every metric of the issue's list must be in the scrape, labelled with volume
and region; b's lag must rise while its fold is paused (SIGUSR1) and a keeps
writing, and fall back to zero once it resumes (SIGUSR2). A mount with
OTEL_EXPORTER_OTLP_ENDPOINT pushes metrics and a span per mutation (with its
log offset) to a loopback OTLP receiver. The names themselves follow
OpenTelemetry's conventions (checked without a mount).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.mount import MountFactory, TidefsMount
from tidefs import telemetry

OTEL_NAME = re.compile(r"^tidefs(\.[a-z][a-z0-9_]*)+$")
UNIT = re.compile(r"^(s|By|\{[a-z]+\})$")


def test_metric_names_follow_opentelemetry_conventions() -> None:
    """Every name is `tidefs.*`, dotted lower case, unique, with a unit and a description."""
    assert set(telemetry.REGION_METRICS) <= set(telemetry.ALL)
    names = [m.name for m in telemetry.ALL]
    assert len(names) == len(set(names))
    assert len({m.prometheus for m in telemetry.ALL}) == len(names)
    for m in telemetry.ALL:
        assert OTEL_NAME.match(m.name), m.name
        assert UNIT.match(m.unit), (m.name, m.unit)  # UCUM, or an annotation for counts
        assert m.kind in ("counter", "histogram", "gauge"), m
        assert m.description, m.name
        # OpenTelemetry leaves units and _total out of names; the exporter adds them.
        assert not m.name.endswith(("_total", "_seconds", "_bytes", ".total")), m.name
        if m.kind == "histogram":
            assert m.unit == "s", m.name  # every histogram is a duration, in seconds
        assert m.prometheus.startswith("tidefs_"), m.prometheus
    for name in (telemetry.SPAN_SUBMIT, telemetry.ATTR_OFFSET, telemetry.ATTR_COMMAND):
        assert OTEL_NAME.match(name), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(port: int) -> Samples:
    """Return every sample of the endpoint: name -> [(labels, value)]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(samples: Samples, name: str) -> float:
    (only,) = samples[name]
    return only[1]


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll `fn` until it returns something truthy (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def exported(m: telemetry.Metric) -> str:
    """The sample name that proves `m` is exported (a histogram's _count)."""
    return m.prometheus + ("_count" if m.kind == "histogram" else "")


@pytest.fixture
def two_regions(mount_factory: MountFactory, tmp_path: Path) -> Iterator[dict[str, Any]]:
    stores = [(name, (tmp_path / f"store-{name}").as_uri()) for name in ("a", "b")]
    ports = {"a": free_port(), "b": free_port()}
    a = mount_factory(regions=stores, region="a", extra=["--metrics-port", str(ports["a"])])
    b = mount_factory(
        volume=a.volume,
        journal_url=a.journal_url,
        region="b",
        extra=["--metrics-port", str(ports["b"])],
    )
    yield {"a": a, "b": b, "ports": ports}


@pytest.mark.fuse
def test_scrape_has_every_metric_and_lag_follows_a_paused_fold(
    two_regions: dict[str, Any],
) -> None:
    a: TidefsMount = two_regions["a"]
    b: TidefsMount = two_regions["b"]
    ports: dict[str, int] = two_regions["ports"]

    # Traffic that touches every instrument: writes in both regions, reads in b
    # (cache misses), failed calls (ENODATA, ENOENT).
    payload = os.urandom(200_000)
    (a.path / "f.bin").write_bytes(payload)
    os.sync()
    wait_for("the file in b", lambda: (b.path / "f.bin").exists() and True)
    assert (b.path / "f.bin").read_bytes() == payload
    assert (b.path / "f.bin").read_bytes() == payload
    (b.path / "from-b.txt").write_text("b writes too")  # an append, and a failed getxattr
    assert not (b.path / "missing").exists()

    for region in ("a", "b"):
        samples = scrape(ports[region])
        missing = [m.name for m in telemetry.REGION_METRICS if exported(m) not in samples]
        assert not missing, f"region {region} does not export {missing}"
        for m in telemetry.REGION_METRICS:
            for labels, _ in samples[exported(m)]:
                assert labels.get("volume") == a.volume and labels.get("region") == region
    sb = scrape(ports["b"])
    # a's blocks reached b by the replicator's copies or by fallback reads (a race).
    assert (
        value(sb, telemetry.FALLBACK_READS.prometheus)
        + value(sb, telemetry.BLOCKS_COPIED.prometheus)
        > 0
    )
    assert any(v > 0 for _, v in sb[telemetry.CACHE_MISSES.prometheus])
    assert all(lbl["errno"].startswith("E") for lbl, _ in sb[telemetry.FUSE_ERRORS.prometheus])
    assert value(scrape(ports["a"]), exported(telemetry.APPEND_DURATION)) > 0

    # Pause b's fold; a keeps writing: b's lag rises, a's stays zero.
    lag = telemetry.LAG_RECORDS.prometheus
    lag_s = telemetry.LAG_SECONDS.prometheus
    assert b.proc is not None
    os.kill(b.proc.pid, signal.SIGUSR1)
    wait_for("b to pause", lambda: "fold paused" in b.log_path.read_text())
    for i in range(10):
        (a.path / f"d{i}").mkdir()
    sb = scrape(ports["b"])
    assert value(sb, lag) >= 10
    assert value(sb, lag_s) > 0
    assert value(scrape(ports["a"]), lag) == 0
    (a.path / "d10").mkdir()
    assert value(scrape(ports["b"]), lag) >= 11

    # Resume: b catches up and its lag falls to zero.
    os.kill(b.proc.pid, signal.SIGUSR2)
    applied = telemetry.APPLIED_OFFSET.prometheus

    def caught_up() -> bool:
        sb, sa = scrape(ports["b"]), scrape(ports["a"])
        return (
            value(sb, lag) == 0
            and value(sb, lag_s) == 0
            and value(sb, applied) == value(sa, applied)
        )

    wait_for("b to catch up", caught_up)
    assert (b.path / "d10").is_dir()


class _Receiver(BaseHTTPRequestHandler):
    got: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.got.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.mark.fuse
def test_otlp_exports_metrics_and_a_span_per_mutation(
    mount_factory: MountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    got: list[tuple[str, bytes]] = []
    handler = type("Receiver", (_Receiver,), {"got": got})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(telemetry.OTLP_ENV, f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "500")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        m = mount_factory()
        (m.path / "traced").mkdir()

        def spans() -> list[Any]:
            found = []
            for path, body in list(got):
                if path != "/v1/traces":
                    continue
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        found += [s for s in ss.spans if s.name == telemetry.SPAN_SUBMIT]
            return found

        def metric_names() -> set[str]:
            names = set()
            for path, body in list(got):
                if path == "/v1/metrics":
                    req = ExportMetricsServiceRequest.FromString(body)
                    for rm in req.resource_metrics:
                        for sm in rm.scope_metrics:
                            names |= {x.name for x in sm.metrics}
            return names

        def mkdir_span() -> Any:
            for s in spans():
                attrs = {a.key: a.value for a in s.attributes}
                if attrs[telemetry.ATTR_COMMAND].string_value == "Mkdir":
                    return attrs
            return None

        attrs = wait_for("the Mkdir span", mkdir_span)
        assert attrs[telemetry.ATTR_OFFSET].int_value > 0
        assert attrs["region"].string_value == "a"
        names = wait_for(
            "metrics over OTLP",
            lambda: (
                (n := metric_names()) >= {telemetry.APPLY_DELAY.name, telemetry.LAG_RECORDS.name}
                and n
            ),
        )
        assert telemetry.FUSE_DURATION.name in names
    finally:
        server.shutdown()
        server.server_close()
