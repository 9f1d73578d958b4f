"""The compose deployment, checked without a Docker engine: its structure and its dashboard.

The Grafana dashboard must only query metrics that tidefs exports (the names
derived in `tidefs.telemetry`), and the compose file, Prometheus and Grafana
configurations must point at each other consistently.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from tidefs import telemetry
from tidefs.fs.cli import build_parser

COMPOSE = Path(__file__).resolve().parent.parent / "compose"
REGIONS = ("east", "west")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load_yaml(name: str) -> Any:
    return yaml.safe_load((COMPOSE / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(load_yaml("docker-compose.yml"))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads((COMPOSE / "grafana/dashboards/tidefs.json").read_text()))


def exported_names() -> set[str]:
    return {m.prometheus for m in telemetry.ALL}


def queried_metrics(expr: str) -> set[str]:
    """The tidefs series a PromQL expression reads, with histogram suffixes removed."""
    names = set()
    for name in re.findall(r"\btidefs_[a-zA-Z0-9_]+", expr):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        names.add(name)
    return names


def test_every_dashboard_query_names_an_exported_metric(dashboard: dict[str, Any]) -> None:
    exported = exported_names()
    queried: set[str] = set()
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = queried_metrics(target["expr"])
            assert names, f"{panel['title']}: {target['expr']} reads no tidefs metric"
            unknown = names - exported
            assert not unknown, f"{panel['title']} queries {unknown}, which tidefs does not export"
            queried |= names
    # The views the deployment promises: lag per region, apply delay, backlog,
    # fallback rate and FUSE latency.
    for m in (
        telemetry.LAG_RECORDS,
        telemetry.LAG_SECONDS,
        telemetry.APPLY_DELAY,
        telemetry.BACKLOG_BLOCKS,
        telemetry.FALLBACK_READS,
        telemetry.FUSE_DURATION,
    ):
        assert m.prometheus in queried, f"no panel shows {m.name}"
    for var in dashboard["templating"]["list"]:
        assert queried_metrics(var["definition"]) <= exported


def test_compose_services_volumes_and_devices(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {"kafka", "prometheus", "grafana"}
    expected |= {f"minio-{r}" for r in REGIONS} | {f"tidefs-{r}" for r in REGIONS}
    assert expected <= set(services)

    kafka_env = services["kafka"]["environment"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert not any("zookeeper" in name for name in services)

    declared = set(compose["volumes"])
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"

    for region in REGIONS:
        svc = services[f"tidefs-{region}"]
        assert "/dev/fuse:/dev/fuse" in svc["devices"]
        assert "SYS_ADMIN" in svc["cap_add"]
        assert (COMPOSE / svc["build"]["context"] / "pyproject.toml").is_file()
        assert (COMPOSE / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        env = svc["environment"]
        assert env["TIDEFS_REGION"] == region
        assert any(v.endswith(":/var/lib/tidefs") for v in svc["volumes"])
        assert urlsplit(env["TIDEFS_JOURNAL"]).hostname == "kafka"
        # Each region's store is its own MinIO service.
        store = urlsplit(env[f"TIDEFS_STORE_{region.upper()}"])
        endpoint = urlsplit(parse_qs(store.query)["endpoint"][0])
        assert endpoint.hostname == f"minio-{region}"
    assert sum("TIDEFS_FORMAT" in services[f"tidefs-{r}"]["environment"] for r in REGIONS) == 1


def test_prometheus_scrapes_every_region_on_its_metrics_port(compose: dict[str, Any]) -> None:
    services = compose["services"]
    config = load_yaml("prometheus.yml")
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    expected = set()
    for region in REGIONS:
        port = services[f"tidefs-{region}"]["environment"]["TIDEFS_METRICS_PORT"]
        expected.add(f"tidefs-{region}:{port}")
    assert targets == expected
    mounted = services["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounted


def test_grafana_is_provisioned_with_the_datasource_and_dashboard(
    compose: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    (source,) = load_yaml("grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert urlsplit(source["url"]).hostname == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
    (provider,) = load_yaml("grafana/provisioning/dashboards/tidefs.yml")["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_the_entrypoint_uses_real_cli_options() -> None:
    """The commands the containers run parse with tidefs's own CLI."""
    script = (COMPOSE / "entrypoint.sh").read_text().replace("\\\n", " ")
    commands = [
        line.strip() for line in script.splitlines() if re.match(r"\s*(exec )?tidefs ", line)
    ]
    assert any(c.startswith("exec tidefs mount") for c in commands)
    parser = build_parser()
    for command in commands:
        command = re.split(r"\|\||&&|;|\d?>", command.removeprefix("exec "))[0]
        argv = shlex.split(command)[1:]
        argv = [re.sub(r"\$\{?[A-Z_]+(:-[^}]*)?\}?", "9464", a) for a in argv]
        args = parser.parse_args(argv)
        if argv[0] == "mount":
            # Explicitly on every interface: Prometheus scrapes from another container.
            assert args.metrics_addr == ("0.0.0.0", 9464) and args.foreground
            assert args.metrics_port is None
