"""A real Prometheus server scrapes two regions and answers PromQL about their lag.

Each region runs `tidefs replicate --metrics-port` (a region's process without
a mount, so the test needs no FUSE). The server is Debian's `prometheus`
package, started here on loopback with its own storage directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_metrics import free_port, scrape, wait_for
from tidefs import telemetry
from tidefs.fs.volume import format_volume
from tidefs.journal.commands import ROOT_INODE, Mkdir, Region
from tidefs.journal.log import open_log
from tidefs.replica.replica import Replica
from tidefs.replica.state import State

PROMETHEUS = shutil.which("prometheus")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def replicate(url: str, region: str, state_dir: Path, port: int) -> list[str]:
    """The command line of region `region`'s replicator of volume `vol`, serving metrics."""
    return [
        *(sys.executable, "-m", "tidefs.fs.cli", "replicate", "vol", "--journal", url),
        *("--region", region, "--state-dir", str(state_dir), "--metrics-port", str(port)),
    ]


def query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
    except OSError:  # not listening yet
        return []
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary (Debian package) is missing")
def test_prometheus_scrapes_both_regions_and_promql_returns_their_lag(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    assert PROMETHEUS is not None
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    regions = [Region(n, (tmp_path / f"store-{n}").as_uri()) for n in ("east", "west")]
    format_volume(url, "vol", regions, "east")
    with open_log(url, "vol") as lg:
        writer = Replica(lg, State.open(tmp_path / "writer"), "east")
        for i in range(5):
            writer.submit(Mkdir(ROOT_INODE, b"d%d" % i, 0o40755, 0, 0))
        last = lg.head() - 1
        writer.state.close()

    ports = {"east": free_port(), "west": free_port()}
    for name, port in ports.items():
        log = open(tmp_path / f"replicate-{name}.log", "wb")  # noqa: SIM115 - kept for the process
        processes.append(
            subprocess.Popen(
                replicate(url, name, tmp_path / f"repl-{name}", port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
    lag = telemetry.LAG_RECORDS.prometheus
    for port in ports.values():
        wait_for("the replicator's endpoint", lambda p=port: _scrapes(p, lag))

    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: tidefs\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{ports['east']}', '127.0.0.1:{ports['west']}']\n"
    )
    with open(tmp_path / "prometheus.log", "wb") as plog:
        processes.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=plog,
                stderr=subprocess.STDOUT,
            )
        )

    def lag_series() -> list[dict[str, Any]]:
        result = query(prom_port, f'{lag}{{volume="vol"}}')
        return result if {r["metric"].get("region") for r in result} == {"east", "west"} else []

    series = wait_for("both regions in Prometheus", lag_series, timeout=90)
    assert all(r["metric"]["job"] == "tidefs" for r in series)
    # Both regions have caught up with the log: zero lag, and the same applied offset.
    offsets = wait_for(
        "both regions at the head",
        lambda: (
            (r := query(prom_port, f"max by (region) ({telemetry.APPLIED_OFFSET.prometheus})"))
            and {x["metric"]["region"]: float(x["value"][1]) for x in r}
            == {"east": last, "west": last}
            and r
        ),
    )
    assert len(offsets) == 2
    zero = query(prom_port, f'{lag}{{volume="vol"}} == 0')
    assert {r["metric"]["region"] for r in zero} == {"east", "west"}


def _scrapes(port: int, name: str) -> bool:
    try:
        return name in scrape(port)
    except OSError:
        return False


def test_a_replicator_endpoint_without_prometheus_still_serves(tmp_path: Path) -> None:
    """`tidefs replicate --metrics-port` serves the region's figures, labelled, even without Prometheus."""
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    format_volume(url, "vol", [Region("east", (tmp_path / "store").as_uri())], "east")
    port = free_port()
    proc = subprocess.Popen(
        replicate(url, "east", tmp_path / "repl", port),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        samples = wait_for(
            "the endpoint",
            lambda: _scrapes(port, telemetry.APPLIED_OFFSET.prometheus) and scrape(port),
        )
        (labels, offset) = samples[telemetry.APPLIED_OFFSET.prometheus][0]
        assert labels["volume"] == "vol" and labels["region"] == "east"
        assert offset == 1  # CreateVolume and the EnableFeatures of this tidefs
        assert telemetry.BACKLOG_BLOCKS.prometheus in samples
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
