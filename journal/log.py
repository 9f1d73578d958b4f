"""The log interface shared by every backend, and the URL that picks one.

A log is one ordered sequence of opaque records per volume. Offsets grow
strictly; a backend may leave gaps (Kafka control records), so readers never
assume `next == previous + 1`. `append` returns only once the record is
durable, which is what lets a FUSE call acknowledge a mutation (invariant 5).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit


class JournalError(Exception):
    """Base of every error raised by the journal layer: log backends and the codec."""


class JournalUnavailable(JournalError):
    """The log could not be reached or written within the configured time."""


class LogMissing(JournalUnavailable):
    """The volume's log does not exist, and the caller asked not to create it."""


class JournalConfigError(JournalError):
    """A journal URL or option is malformed or names an unsupported backend."""


KAFKA_CONFIG_ENV = "TIDEFS_KAFKA_CONFIG"
"""The variable naming a librdkafka properties file (`tidefs --kafka-config FILE` sets it)."""

REDACTED = "***"
"""What a secret is shown as."""

_SECRET_NAME = re.compile(
    r"pass|secret|token|credential|private|signature|jaas|oauthbearer\.config|\.pem$|(^|[._])key$",
    re.IGNORECASE,
)
"""Names of URL parameters (librdkafka settings among them) whose value is a secret."""

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/?#@\s'\"]*)@")
_PARAM = re.compile(r"(?P<sep>[?&])(?P<name>[^=&#\s'\"]+)=(?P<value>[^&#\s'\"]*)")


def secret_name(name: str) -> bool:
    """Whether a URL parameter or client setting of this name holds a secret (`sasl.password`)."""
    return bool(_SECRET_NAME.search(name))


def redact_url(text: str) -> str:
    """Return `text` with the secrets of every URL in it replaced by `***`.

    The one helper for journal and store URLs, and for messages that quote
    them: a password in `scheme://user:password@host` (a bare `token@` too),
    and the value of every query parameter whose name says secret
    (`sasl.password`, `ssl.key.password`, `...token`), also inside a URL
    given as a parameter (`?endpoint=http://user:pw@host`). Whatever tidefs
    prints, logs, publishes or puts on a command line goes through it.
    """

    def userinfo(m: re.Match[str]) -> str:
        user, sep, _password = m["info"].partition(":")
        return f"{m['scheme']}{user}:{REDACTED}@" if sep else f"{m['scheme']}{REDACTED}@"

    def param(m: re.Match[str]) -> str:
        value = m["value"]
        if secret_name(unquote(m["name"])):
            value = REDACTED
        elif "@" in unquote(value):
            value = redact_url(unquote(value))
        return f"{m['sep']}{m['name']}={value}"

    return _PARAM.sub(param, _USERINFO.sub(userinfo, text))


@dataclass(frozen=True, slots=True)
class Record:
    """One record read from a log: its offset, the append time (ns) and the payload."""

    offset: int
    timestamp_ns: int
    payload: bytes


class Log(abc.ABC):
    """One volume's ordered log. Implementations are safe to share between threads."""

    volume: str

    @abc.abstractmethod
    def append(self, payload: bytes, timestamp_ns: int | None = None) -> int:
        """Append one record and return its offset once it is durable.

        Concurrent callers are batched into one durable write (group commit).
        Raises JournalUnavailable after the backend's timeout, never hangs.
        """

    def append_many(self, entries: Sequence[tuple[bytes, int | None]]) -> list[int]:
        """Append `(payload, timestamp_ns)` records in this order and return their offsets.

        A backend that can makes them durable in one write (SQLite: one
        transaction; Kafka: one wait for every delivery), so that a committer
        gathering the commands of many callers pays one round trip for all of
        them. Other appends may still land between them: offsets are in order,
        not necessarily consecutive.

        Every record is checked before any is appended: a refused record (not
        bytes, too large: TypeError, ValueError, JournalError) appends none of
        them. After JournalUnavailable some may have landed; retry the whole
        batch (a fold applies each request id once). This default appends one
        at a time and has neither property; both backends override it.
        """
        return [self.append(payload, timestamp_ns) for payload, timestamp_ns in entries]

    @abc.abstractmethod
    def read(self, start: int, max_records: int = 1000, timeout: float = 0.0) -> list[Record]:
        """Return up to `max_records` records with offset >= `start`, in order.

        When none is available yet, wait up to `timeout` seconds for one to be
        appended (by any process) and return an empty list if none was.
        """

    @abc.abstractmethod
    def head(self) -> int:
        """Return the offset the next appended record will get (0 for an empty log)."""

    @abc.abstractmethod
    def offset_for_time(self, timestamp_ns: int) -> int:
        """Return the first offset whose append time is >= `timestamp_ns` (head() if none)."""

    def start(self) -> int:
        """Return the lowest offset still stored (0 unless the log was trimmed)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def url_options(url: str, query: str, options: dict[str, object]) -> dict[str, object]:
    """Merge a journal URL's query parameters with keyword options (keywords win)."""
    try:
        parsed = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True))
    except ValueError as exc:
        if query:
            raise JournalConfigError(f"malformed query in journal URL {redact_url(url)!r}") from exc
        parsed = {}
    return {**parsed, **options}


def positive_float(value: object) -> float:
    """Convert an option to a float > 0 (ValueError otherwise)."""
    number = float(value)  # type: ignore[arg-type]
    if not number > 0:
        raise ValueError("must be positive")
    return number


def boolean(value: object) -> bool:
    """Convert an option to a bool: true/false, yes/no, on/off, 1/0 (ValueError otherwise)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def open_log(url: str, volume: str, **options: object) -> Log:
    """Open the log of `volume` at a journal URL: `sqlite:///path` or `kafka://host:port[,..]`."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from tidefs.journal.sqlite import SqliteLog

        return SqliteLog.from_url(url, volume, **options)
    if scheme == "kafka":
        from tidefs.journal.kafka import KafkaLog

        return KafkaLog.from_url(url, volume, **options)
    raise JournalConfigError(
        f"unsupported journal URL {redact_url(url)!r}: "
        "expected sqlite:///path/log.db or kafka://host:port"
    )
