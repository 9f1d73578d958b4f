"""Secrets stay out of URLs that tidefs shows: redaction, and Kafka settings from env and file.

A journal or store URL is printed in errors, logged, and (for a daemonized
mount) was its command line, which `ps` shows to every local user. Kafka
SASL/TLS settings therefore also come from a properties file and from
`TIDEFS_KAFKA_<SETTING>` variables, and every URL tidefs shows is redacted.
The settings are checked against a real broker with a SASL/PLAIN listener:
a wrong password fails to open the log, so a successful open proves which
source won.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.cli import tidefs_cli as run
from tests.harness.kafka import KafkaBroker, _locate_or_skip
from tests.harness.mount import fuse_available
from tidefs.journal.kafka import KafkaLog, client_settings, read_properties
from tidefs.journal.log import (
    KAFKA_CONFIG_ENV,
    JournalConfigError,
    JournalUnavailable,
    open_log,
    redact_url,
)

SECRET = "hunter2-s3cr3t"
USER = "tidefs"
SASL = "security.protocol=SASL_PLAINTEXT&sasl.mechanism=PLAIN"


def private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# -- redaction -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"kafka://h:9092?sasl.username=bob&sasl.password={SECRET}&timeout=3",
            "kafka://h:9092?sasl.username=bob&sasl.password=***&timeout=3",
        ),
        (f"kafka://h:1?ssl.key.password={SECRET}", "kafka://h:1?ssl.key.password=***"),
        (
            f"kafka://h:1?sasl.oauthbearer.client.secret={SECRET}",
            "kafka://h:1?sasl.oauthbearer.client.secret=***",
        ),
        (f"s3://AKIAXYZ:{SECRET}@bucket/p", "s3://AKIAXYZ:***@bucket/p"),
        (
            f"s3://b/p?endpoint=http://u:{SECRET}@h:9000&region=r",
            "s3://b/p?endpoint=http://u:***@h:9000&region=r",
        ),
        (f"s3://b/p?aws_secret_access_key={SECRET}", "s3://b/p?aws_secret_access_key=***"),
        (f"https://{SECRET}@example.com/x", "https://***@example.com/x"),
        ("sqlite:///var/lib/tidefs/log.db?timeout=5", "sqlite:///var/lib/tidefs/log.db?timeout=5"),
        ("file:///srv/blocks", "file:///srv/blocks"),
    ],
)
def test_redact_url_hides_every_secret_and_nothing_else(url: str, shown: str) -> None:
    out = redact_url(url)
    assert out == shown
    # In a message, too, and idempotent.
    assert SECRET not in redact_url(f"cannot open {url!r}: refused")
    assert redact_url(out) == out


def test_secrets_never_reach_error_messages(tmp_path: Path) -> None:
    """The journal and store URLs that were refused are quoted without their secrets."""
    journal = f"sqlite:///{tmp_path}/log.db"
    cases = [
        # An S3 URL with credentials is refused (it would enter the log): not echoed.
        ("format", "v", "--journal", journal, "--region", f"a=s3://AKIA:{SECRET}@bucket/p"),
        ("format", "v", "--journal", journal, "--region", f"a=s3://b/p?secret_key={SECRET}"),
        (
            "format", "v", "--journal", journal,
            "--region", f"a=s3://b/p?endpoint=http://u:{SECRET}@127.0.0.1:9",
        ),
        # A Kafka URL with an unknown option is refused, quoting the URL.
        ("log", "v", "--journal", f"kafka://127.0.0.1:9?sasl.password={SECRET}&bogus=1"),
        ("log", "v", "--journal", f"kafka://u:{SECRET}@127.0.0.1:9"),
        ("log", "v", "--journal", f"sqlite:///{tmp_path}/x.db?sasl.password={SECRET}"),
        ("log", "v", "--journal", f"nosuch://u:{SECRET}@h/x"),
        ("log", "v", "--journal", f"sqlite://u:{SECRET}@h/x.db"),
    ]  # fmt: skip
    for args in cases:
        proc = run(*args)
        assert proc.returncode == 1, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert SECRET not in proc.stderr + proc.stdout, proc.stderr
        assert "***" in proc.stderr or "credentials" in proc.stderr or "user" in proc.stderr
    assert not (tmp_path / "x.db").exists()


# -- the settings' sources ---------------------------------------------------------


def test_settings_precedence_environment_then_file_then_url(tmp_path: Path) -> None:
    conf = private_file(
        tmp_path / "client.properties",
        "# SASL for the journal\n\nsasl.username = alice\nsasl.password=from-file\n"
        "ssl.ca.location=/etc/ca.pem\n",
    )
    url = {"sasl.password": "from-url", "sasl.mechanism": "PLAIN", "ssl.ca.location": "u"}
    env = {
        KAFKA_CONFIG_ENV: str(conf),
        "TIDEFS_KAFKA_SASL_PASSWORD": "from-env",
        "TIDEFS_KAFKA_LIBS": "/not/a/setting",
        "UNRELATED": "x",
    }
    merged = client_settings(url, env)
    assert merged == {
        "sasl.password": "from-env",
        "sasl.username": "alice",
        "sasl.mechanism": "PLAIN",
        "ssl.ca.location": "/etc/ca.pem",
    }
    assert client_settings(url, {KAFKA_CONFIG_ENV: str(conf)})["sasl.password"] == "from-file"
    assert client_settings(url, {})["sasl.password"] == "from-url"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_config_file_open_to_other_users_is_refused(tmp_path: Path, mode: int) -> None:
    conf = private_file(tmp_path / "k.properties", f"sasl.password={SECRET}\n", mode)
    with pytest.raises(JournalConfigError, match="chmod 600") as err:
        read_properties(str(conf))
    assert SECRET not in str(err.value)
    # Through the CLI: one line, exit 1, no secret; the same with the variable.
    for args, env in (
        (["--kafka-config", str(conf)], {}),
        ([], {KAFKA_CONFIG_ENV: str(conf)}),
    ):
        proc = run("log", "v", "--journal", "kafka://127.0.0.1:9", *args, env=env)
        assert proc.returncode == 1
        assert "open to other users" in proc.stderr
        assert SECRET not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_a_malformed_config_file_names_the_line_not_the_value(tmp_path: Path) -> None:
    conf = private_file(tmp_path / "k.properties", f"sasl.username=a\n{SECRET}\n")
    with pytest.raises(JournalConfigError, match="line 2") as err:
        read_properties(str(conf))
    assert SECRET not in str(err.value)
    with pytest.raises(JournalConfigError, match="cannot read"):
        read_properties(str(tmp_path / "missing"))


def test_bootstrap_servers_belong_to_the_url(tmp_path: Path) -> None:
    env_conf = private_file(tmp_path / "k.properties", "bootstrap.servers=10.0.0.1:9092\n")
    os.environ[KAFKA_CONFIG_ENV] = str(env_conf)
    try:
        with pytest.raises(JournalConfigError, match="name the brokers in the URL"):
            KafkaLog.from_url("kafka://127.0.0.1:9", "v")
    finally:
        del os.environ[KAFKA_CONFIG_ENV]


# -- a real broker with a SASL/PLAIN listener -------------------------------------------


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    libs, java = _locate_or_skip()
    broker = KafkaBroker(
        libs, tmp_path_factory.mktemp("kafka-sasl"), java=java, sasl_users={USER: SECRET}
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in list(os.environ):
        if var.startswith("TIDEFS_KAFKA_") and var != "TIDEFS_KAFKA_LIBS":
            monkeypatch.delenv(var)
    return monkeypatch


def _opens(url: str, volume: str) -> bool:
    try:
        with open_log(url, volume) as lg:
            lg.head()
    except JournalUnavailable:
        return False
    return True


@pytest.mark.kafka
def test_sasl_credentials_reach_the_client_from_each_source(
    sasl_broker: KafkaBroker, clean_env: pytest.MonkeyPatch, tmp_path: Path, journal_volume: str
) -> None:
    base = f"{sasl_broker.sasl_url}?timeout=4&{SASL}&sasl.username={USER}"
    good_file = private_file(tmp_path / "good.properties", f"sasl.password={SECRET}\n")
    bad_file = private_file(tmp_path / "bad.properties", "sasl.password=wrong-in-file\n")

    # Without any password the client refuses; with the right one in the URL it opens.
    with pytest.raises(JournalConfigError, match=r"sasl\.password must be set"):
        _opens(base, journal_volume)
    assert _opens(f"{base}&sasl.password={SECRET}", journal_volume)
    # The file beats the URL.
    clean_env.setenv(KAFKA_CONFIG_ENV, str(good_file))
    assert _opens(f"{base}&sasl.password=wrong-in-url", journal_volume)
    clean_env.setenv(KAFKA_CONFIG_ENV, str(bad_file))
    assert not _opens(f"{base}&sasl.password={SECRET}", journal_volume)
    # The environment beats both.
    clean_env.setenv("TIDEFS_KAFKA_SASL_PASSWORD", SECRET)
    assert _opens(f"{base}&sasl.password=wrong-in-url", journal_volume)
    clean_env.setenv("TIDEFS_KAFKA_SASL_PASSWORD", "wrong-in-env")
    clean_env.setenv(KAFKA_CONFIG_ENV, str(good_file))
    assert not _opens(base, journal_volume)
    # Every setting may come from the environment: the URL names only the broker.
    clean_env.delenv(KAFKA_CONFIG_ENV)
    clean_env.setenv("TIDEFS_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    clean_env.setenv("TIDEFS_KAFKA_SASL_MECHANISM", "PLAIN")
    clean_env.setenv("TIDEFS_KAFKA_SASL_USERNAME", USER)
    clean_env.setenv("TIDEFS_KAFKA_SASL_PASSWORD", SECRET)
    assert _opens(f"{sasl_broker.sasl_url}?timeout=4", journal_volume)


def _daemon_pid(mountpoint: Path) -> int:
    from tidefs.fs.mount import mount_record

    record = mount_record(str(mountpoint))
    assert record is not None
    return int(record["pid"])


@pytest.mark.kafka
@pytest.mark.fuse
def test_a_daemonized_mount_shows_no_secret(
    sasl_broker: KafkaBroker, clean_env: pytest.MonkeyPatch, tmp_path: Path, journal_volume: str
) -> None:
    """Neither the daemon's command line, its log, its status nor any message holds the password.

    The password is given in the journal URL (the worst case): the daemon
    still runs with it redacted from its command line; and with only
    `--kafka-config` the mount, `status` and `sync` get it from the file.
    """
    if not fuse_available():
        pytest.skip("no /dev/fuse or fusermount3")
    secret_url = f"{sasl_broker.sasl_url}?{SASL}&sasl.username={USER}&sasl.password={SECRET}"
    conf = private_file(
        tmp_path / "kafka.properties",
        f"security.protocol=SASL_PLAINTEXT\nsasl.mechanism=PLAIN\nsasl.username={USER}\n"
        f"sasl.password={SECRET}\n",
    )
    store = (tmp_path / "store").as_uri()
    proc = run("format", journal_volume, "--journal", secret_url, "--region", f"a={store}")
    assert proc.returncode == 0, proc.stderr
    for n, (journal, extra) in enumerate(
        [(secret_url, []), (sasl_broker.sasl_url, ["--kafka-config", str(conf)])]
    ):
        mnt, state = tmp_path / f"mnt{n}", tmp_path / f"state{n}"
        mnt.mkdir()
        dirs = ["--state-dir", str(state), "--cache-dir", str(tmp_path / f"cache{n}")]
        proc = run("mount", journal_volume, str(mnt), "--journal", journal, "--region", "a",
                   *dirs, *extra)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        try:
            (mnt / f"f{n}").write_text("written")
            pid = _daemon_pid(mnt)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            assert "tidefs.fs.mount" in cmdline and str(mnt) in cmdline
            assert SECRET not in cmdline, cmdline
            status = run("status", journal_volume, "--journal", sasl_broker.sasl_url,
                         "--kafka-config", str(conf), "--json")  # fmt: skip
            assert status.returncode == 0, status.stderr
            deadline = time.monotonic() + 20
            while "a" not in json.loads(status.stdout) and time.monotonic() < deadline:
                time.sleep(0.5)
                status = run("status", journal_volume, "--journal", sasl_broker.sasl_url,
                             "--kafka-config", str(conf), "--json")  # fmt: skip
            assert "a" in json.loads(status.stdout), status.stdout
            assert SECRET not in status.stdout
            # sync finds the journal's settings through the mount's record.
            sync = run("sync", str(mnt), "--timeout", "30")
            assert sync.returncode == 0, sync.stderr
        finally:
            assert run("umount", str(mnt)).returncode == 0
        log_text = (state / "mount.log").read_text(errors="replace")
        assert SECRET not in log_text
    # A wrong password: the mount fails with one line that holds no secret.
    mnt = tmp_path / "mnt-bad"
    mnt.mkdir()
    bad = secret_url.replace(SECRET, "wrong-" + SECRET) + "&timeout=3"
    proc = run("mount", journal_volume, str(mnt), "--journal", bad, "--region", "a",
               "--state-dir", str(tmp_path / "state-bad"))  # fmt: skip
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert SECRET not in proc.stderr
    assert not (tmp_path / "state-bad").exists()
