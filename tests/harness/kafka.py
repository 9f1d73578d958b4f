"""Kafka broker fixture (KRaft, started from the jars that scripts/fetch-kafka resolves).

Tests run against a real Apache Kafka broker, never a mock of the client: the
behaviours the journal depends on (idempotent delivery, high watermarks,
offsets for times, time-outs when the broker is gone) are exactly the ones a
mock would get wrong. `KafkaBroker` is a plain class so that the benchmark
and the chaos scenarios start brokers the same way the fixtures do.

One broker serves the whole session (its JVM takes seconds to start); tests
stay apart by using fresh volume names (`journal_volume`). A broker is a
single KRaft node (broker and controller in one JVM) listening on free
loopback ports chosen at start; `stop()` kills it and `start()` brings it
back on the same ports and data directory, as a crashed broker would come
back.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIBS = REPO_ROOT / ".cache" / "kafka" / "libs"
PROBE_TOPIC = "tidefs-harness-probe"
"""Created at start: a broker is ready when it accepts a topic and elects its leader."""

_LOG4J = """\
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
"""


class BrokerUnavailable(Exception):
    """The broker cannot be run here (no jars, no java) or did not become ready."""


def free_port() -> int:
    """Return a loopback TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def locate_kafka(libs: Path | None = None) -> tuple[Path, str]:
    """Return (jar directory, java executable); raise BrokerUnavailable saying what is missing.

    `TIDEFS_KAFKA_LIBS` overrides the jar directory, `JAVA_HOME` the JVM.
    """
    libs = libs or Path(os.environ.get("TIDEFS_KAFKA_LIBS") or DEFAULT_LIBS)
    if not any(libs.glob("kafka_*.jar")):
        raise BrokerUnavailable(
            f"Apache Kafka broker jars not found in {libs}: run scripts/fetch-kafka (needs Maven)"
        )
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise BrokerUnavailable("java not found (set JAVA_HOME or put a JRE 17+ on PATH)")
    return libs, java


def _cluster_id() -> str:
    """Return a fresh KRaft cluster id, as `StorageTool random-uuid` would (without a JVM start)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):  # Kafka never hands out ids that look like options
            return text


class KafkaBroker:
    """A single-node Apache Kafka broker (KRaft) in a working directory, on loopback ports."""

    def __init__(
        self,
        libs: Path,
        workdir: Path,
        *,
        java: str = "java",
        port: int | None = None,
        controller_port: int | None = None,
        heap: str = "512m",
        ready_timeout: float = 90.0,
        proxied_port: int | None = None,
        sasl_users: dict[str, str] | None = None,
    ) -> None:
        self.libs = libs
        self.workdir = Path(workdir)
        self.java = java
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        self.heap = heap
        self.ready_timeout = ready_timeout
        self.log_path = self.workdir / "broker.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._formatted = False
        # A second listener that advertises `proxied_port` instead of its own, so
        # that clients bootstrapping through a TCP proxy on that port keep
        # talking through it (the chaos suite cuts a region off that way).
        self.proxied_port = proxied_port
        self.proxied_listen_port = free_port() if proxied_port is not None else None
        # A SASL/PLAIN listener beside the plaintext one, for these user -> password pairs.
        self.sasl_users = dict(sasl_users or {})
        self.sasl_port = free_port() if sasl_users else None

    @property
    def bootstrap(self) -> str:
        """The bootstrap servers string of this broker: "127.0.0.1:PORT"."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The journal URL of this broker: "kafka://127.0.0.1:PORT"."""
        return f"kafka://{self.bootstrap}"

    @property
    def sasl_url(self) -> str:
        """The journal URL of the SASL/PLAIN listener (credentials go in client settings)."""
        assert self.sasl_port is not None, "broker started without sasl_users"
        return f"kafka://127.0.0.1:{self.sasl_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the broker (formatting its data directory the first time) and wait until it is ready."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self._formatted:
            self._write_config()
            self._run_tool(
                "kafka.tools.StorageTool",
                "format",
                "-t",
                _cluster_id(),
                "-c",
                str(self.workdir / "server.properties"),
            )
            self._formatted = True
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [
                    *self._java_cmd(f"-Xmx{self.heap}"),
                    "kafka.Kafka",
                    str(self.workdir / "server.properties"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        finally:
            log.close()
        _live.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self, kill: bool = True) -> None:
        """Stop the broker: SIGKILL by default (a crash), SIGTERM and wait when `kill` is false."""
        proc, self._proc = self._proc, None
        _live.discard(self)
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()

    def restart(self, kill: bool = True) -> None:
        """Stop and start again on the same ports and data directory."""
        self.stop(kill=kill)
        self.start()

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------

    def _java_cmd(self, *jvm_args: str) -> list[str]:
        return [
            self.java,
            *jvm_args,
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.workdir / 'log4j.properties'}",
            "-cp",
            f"{self.libs}/*",
        ]

    def _run_tool(self, *args: str) -> None:
        result = subprocess.run(
            [*self._java_cmd("-Xmx256m"), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=self.ready_timeout,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")[-4000:]
            raise BrokerUnavailable(f"{args[0]} {args[1]} failed ({result.returncode}):\n{output}")

    def _write_config(self) -> None:
        data = self.workdir / "data"
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            # One partition for the internal topics: a test broker needs no spread,
            # and creating 50 partitions of __consumer_offsets costs seconds.
            "offsets.topic.num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # A killed broker comes back as a new incarnation that the controller
            # refuses until the old one's session expires (9 s by default): keep
            # that short so that a chaos restart takes seconds, not tens of them.
            "broker.session.timeout.ms": "2000",
            "broker.heartbeat.interval.ms": "500",
            "auto.create.topics.enable": "false",
        }
        if self.proxied_port is not None:
            settings["listeners"] += f",PROXIED://127.0.0.1:{self.proxied_listen_port}"
            settings["advertised.listeners"] += f",PROXIED://127.0.0.1:{self.proxied_port}"
            settings["listener.security.protocol.map"] += ",PROXIED:PLAINTEXT"
        if self.sasl_port is not None:
            users = " ".join(f'user_{name}="{pw}"' for name, pw in self.sasl_users.items())
            settings["listeners"] += f",SASL://127.0.0.1:{self.sasl_port}"
            settings["advertised.listeners"] += f",SASL://127.0.0.1:{self.sasl_port}"
            settings["listener.security.protocol.map"] += ",SASL:SASL_PLAINTEXT"
            settings["sasl.enabled.mechanisms"] = "PLAIN"
            settings["listener.name.sasl.plain.sasl.jaas.config"] = (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            )
        (self.workdir / "server.properties").write_text(
            "".join(f"{key}={value}\n" for key, value in settings.items())
        )
        (self.workdir / "log4j.properties").write_text(_LOG4J)

    def _wait_ready(self) -> None:
        """Wait until the broker accepts and leads a topic; raise BrokerUnavailable with its log."""
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic

        deadline = time.monotonic() + self.ready_timeout
        admin: AdminClient | None = None
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise BrokerUnavailable(f"Kafka broker exited ({code}):\n{self._log_tail()}")
            if not _port_open(self.port):
                time.sleep(0.1)
                continue
            if admin is None:
                admin = AdminClient(
                    {"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 2000, "log_level": 0}
                )
            try:
                meta = admin.list_topics(timeout=2)
                topic = meta.topics.get(PROBE_TOPIC)
                if topic is None or topic.error is not None:
                    futures = admin.create_topics(
                        [NewTopic(PROBE_TOPIC, 1, 1)], request_timeout=2, operation_timeout=2
                    )
                    try:
                        futures[PROBE_TOPIC].result(timeout=5)
                    except KafkaException as exc:
                        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                            raise
                elif all(p.leader >= 0 for p in topic.partitions.values()):
                    return
            except Exception as exc:  # not ready yet: retry until the deadline
                last = str(exc)
            time.sleep(0.1)
        raise BrokerUnavailable(
            f"Kafka broker on {self.bootstrap} not ready within {self.ready_timeout}s "
            f"({last}):\n{self._log_tail()}"
        )

    def _log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no broker log)"

    def __repr__(self) -> str:
        return f"KafkaBroker({self.bootstrap}, running={self.running})"


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


_live: set[KafkaBroker] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Never leave a JVM behind when the interpreter exits without tearing fixtures down."""
    for broker in list(_live):
        with contextlib.suppress(Exception):
            broker.stop()


def _locate_or_skip() -> tuple[Path, str]:
    """Locate the jars and java; fail under CI=true (the setup is broken), skip elsewhere."""
    try:
        return locate_kafka()
    except BrokerUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Kafka broker cannot run: {exc}", pytrace=False)
        pytest.skip(f"Kafka broker cannot run: {exc}")


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """The session's Kafka broker: `.bootstrap`, `.url`, and `stop()`/`start()` for chaos tests."""
    libs, java = _locate_or_skip()
    broker = KafkaBroker(libs, tmp_path_factory.mktemp("kafka"), java=java)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_broker_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[], KafkaBroker]]:
    """Start private brokers (for tests that kill theirs); every one is stopped at teardown."""
    libs, java = _locate_or_skip()
    started: list[KafkaBroker] = []

    def make() -> KafkaBroker:
        broker = KafkaBroker(libs, tmp_path_factory.mktemp("kafka-private"), java=java)
        started.append(broker)
        broker.start()
        return broker

    try:
        yield make
    finally:
        for broker in started:
            broker.stop()


@pytest.fixture
def journal_volume() -> str:
    """A volume name no other test uses: the Kafka broker is shared by the whole session."""
    return f"t{uuid.uuid4().hex[:16]}"


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("kafka", id="kafka", marks=pytest.mark.kafka),
    ]
)
def journal_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A journal URL for each backend: a fresh SQLite file, or the session's Kafka broker."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'log.db'}"
    broker: KafkaBroker = request.getfixturevalue("kafka_broker")
    if not broker.running:  # a chaos test that stopped it must not break the tests after it
        broker.start()
    return broker.url
