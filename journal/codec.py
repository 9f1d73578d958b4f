"""The byte form of a log record: Avro single-object encoding of an `Envelope`.

Every record in a volume's log is one `Envelope` written as Avro's single-object
encoding: the two marker bytes C3 01, the 8-byte little-endian CRC-64-AVRO
(Rabin) fingerprint of the writer schema's Parsing Canonical Form, then the
Avro binary body. The fingerprint is what lets the log outlive any one release
of tidefs: a record names the exact schema it was written with, and the reader
resolves that writer schema to the current one (Avro schema resolution), so a
replay from offset 0 reads records of every version ever released.

The schema lives in `schemas/envelope.avsc` (the current version) and
`schemas/history/envelope.vN.avsc` (every released version, the current one
included). Versions are BACKWARD_TRANSITIVE: the current reader reads every
older record (a field an older version lacks carries a default; union branches
are only appended), but an older tidefs cannot read a newer command or field.
So a writer encodes with the version its volume has enabled
(`tidefs.journal.features`), and `encode` refuses what that version cannot
carry rather than dropping it. A record whose fingerprint is not among them was
written by a newer tidefs; decoding it raises `UnknownSchemaError` rather than
guessing, and the fold stops there.

Decoding is strict because the log is the source of truth (invariant 1): a
record is either decoded completely, to its last byte, or rejected with
`CorruptRecordError`; a half-read command is never folded. Encoding validates
the envelope against the schema first, so that no malformed record is ever
appended (a float silently truncated to a long would be folded forever).

The mapping between the dataclasses of `tidefs.journal.commands` and fastavro's
dicts is generic: record names are class names, field names are attribute
names, arrays are tuples, and the union's branch is named in fastavro's tuple
notation. Schemas are parsed and the converters built once, at import; decode
is on the fold's hot path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.types import Schema
from fastavro.validation import ValidationError, validate

from tidefs.journal import commands
from tidefs.journal.commands import Envelope
from tidefs.journal.log import JournalError

MARKER = b"\xc3\x01"
"""The two bytes that open every single-object encoded record (Avro spec, version 1)."""

HEADER_SIZE = len(MARKER) + 8
"""Marker plus the 8-byte schema fingerprint that precede the Avro body."""

NAMESPACE = "tidefs"
"""The Avro namespace of every record; record names are the dataclass names."""

_CURRENT_FILE = "envelope.avsc"
_HISTORY_DIR = "history"
_HISTORY_FILE = re.compile(r"envelope\.v(\d+)\.avsc")


class CodecError(JournalError):
    """A record could not be encoded or decoded.

    Every subclass takes a bare message as its only positional argument, so
    that callers may re-raise `type(exc)(f"record at offset {o}: {exc}")`.
    """


class UnknownSchemaError(CodecError):
    """A record names a schema fingerprint this tidefs does not know (a newer writer)."""

    def __init__(self, message: str, *, fingerprint: bytes | None = None) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint


class CorruptRecordError(CodecError):
    """A record is not a well-formed envelope: bad marker, truncated, or trailing bytes."""


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One released (or the current) version of the envelope schema."""

    version: int
    schema: dict[str, Any]
    """The schema as parsed by fastavro, ready for its readers and writers."""
    fingerprint: bytes
    """CRC-64-AVRO of the Parsing Canonical Form, little-endian, as in the record header."""
    canonical_form: str


def schema_fingerprint(schema: Schema) -> bytes:
    """Return the 8-byte CRC-64-AVRO fingerprint of `schema`, in record-header byte order."""
    # fastavro returns the hex of the little-endian bytes, the order the spec
    # (and Java's SchemaNormalization.parsingFingerprint) puts in the header.
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


def _parse(text: str, version: int) -> SchemaVersion:
    # Each version gets its own table of named types: v0's tidefs.Mknod is not v1's.
    parsed = fastavro.parse_schema(json.loads(text), named_schemas={})
    if not isinstance(parsed, dict) or parsed.get("name") != f"{NAMESPACE}.Envelope":
        raise TypeError(f"schema v{version} is not the record {NAMESPACE}.Envelope")
    return SchemaVersion(
        version=version,
        schema=parsed,
        fingerprint=schema_fingerprint(parsed),
        canonical_form=to_parsing_canonical_form(parsed),
    )


def _load_versions() -> tuple[dict[int, SchemaVersion], SchemaVersion]:
    """Read every history version and the current schema from the package data."""
    root = resources.files("tidefs.schemas")
    history: dict[int, SchemaVersion] = {}
    for entry in root.joinpath(_HISTORY_DIR).iterdir():
        match = _HISTORY_FILE.fullmatch(entry.name)
        if match is not None:
            version = int(match.group(1))
            history[version] = _parse(entry.read_text(encoding="utf-8"), version)
    current_text = root.joinpath(_CURRENT_FILE).read_text(encoding="utf-8")
    current = _parse(current_text, -1)
    released = [v for v in history.values() if v.fingerprint == current.fingerprint]
    # The current schema is normally the newest history file; an edited, not
    # yet released one gets the next number (and the history test fails).
    number = released[0].version if released else max(history, default=-1) + 1
    current = dataclasses.replace(current, version=number)
    history[number] = current
    return dict(sorted(history.items())), current


_versions, CURRENT = _load_versions()

VERSIONS: Mapping[int, SchemaVersion] = MappingProxyType(_versions)
"""Every schema version this tidefs reads, by number, oldest first; the current one included."""

CURRENT_VERSION: int = CURRENT.version
"""The number of the schema version `encode` writes."""

CURRENT_FINGERPRINT: bytes = CURRENT.fingerprint
"""The 8-byte fingerprint in the header of every record `encode` writes."""

_BY_FINGERPRINT: dict[bytes, SchemaVersion] = {v.fingerprint: v for v in _versions.values()}


# -- dataclasses <-> fastavro values -----------------------------------------

_Convert = Callable[[Any], Any]

_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (*commands.COMMAND_TYPES, commands.Region, commands.SliceRef, Envelope)
}
_FIELD_NAMES: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _CLASSES.values()
}
_UNION_NAMES: dict[type, str] = {
    cls: f"{NAMESPACE}.{cls.__name__}" for cls in commands.COMMAND_TYPES
}


def _to_avro(value: Any) -> Any:
    """Return `value` as fastavro writes it: dataclasses as dicts, tuples as lists.

    A command is a branch of the envelope's union, so it is written in
    fastavro's tuple notation `(record name, dict)`: the branch is then named,
    never guessed from the fields (Unlink and Rmdir have the same ones).
    """
    cls = type(value)
    names = _FIELD_NAMES.get(cls)
    if names is not None:
        datum = {name: _to_avro(getattr(value, name)) for name in names}
        union_name = _UNION_NAMES.get(cls)
        return datum if union_name is None else (union_name, datum)
    if cls is tuple:
        return [_to_avro(item) for item in value]
    return value


def _converter(
    schema: Any, named: Mapping[str, Any], built: dict[str, _Convert]
) -> _Convert | None:
    """Return what turns fastavro's value of `schema` into its dataclass value (None: as is)."""
    if isinstance(schema, str):
        schema = named.get(schema, schema)
        if isinstance(schema, str):
            return None  # a primitive
    if isinstance(schema, list):
        branches = [named.get(b, b) if isinstance(b, str) else b for b in schema]
        records = [b for b in branches if isinstance(b, dict) and b["type"] == "record"]
        if not records:
            return None  # ["null", "long"] and the like are read as they are
        if len(records) + ("null" in branches) != len(branches):
            raise TypeError(f"unsupported union {schema!r}: records and null only")
        by_name = {b["name"]: _record_converter(b, named, built) for b in records}
        # return_record_name=True makes fastavro read a record branch as (name, dict).
        return lambda v: None if v is None else by_name[v[0]](v[1])
    if schema["type"] == "array":
        item = _converter(schema["items"], named, built)
        return tuple if item is None else lambda v: tuple(map(item, v))
    if schema["type"] == "record":
        return _record_converter(schema, named, built)
    return None  # fixed (the request id) and enums are read as they are


def _record_converter(
    schema: dict[str, Any], named: Mapping[str, Any], built: dict[str, _Convert]
) -> _Convert:
    """Return what turns fastavro's dict of record `schema` into an instance of its dataclass."""
    name = schema["name"]
    if name in built:
        return built[name]
    cls = _CLASSES[name.rpartition(".")[2]]
    nested: list[tuple[str, _Convert]] = []
    for f in schema["fields"]:
        convert = _converter(f["type"], named, built)
        if convert is not None:
            nested.append((f["name"], convert))

    def record(datum: dict[str, Any]) -> Any:
        for field_name, convert in nested:
            datum[field_name] = convert(datum[field_name])
        return cls(**datum)

    built[name] = record
    return record


_to_envelope = _record_converter(CURRENT.schema, CURRENT.schema["__named_schemas"], {})


# -- encode / decode ----------------------------------------------------------


def _lacking(version: SchemaVersion) -> dict[type, tuple[tuple[str, Any], ...] | None]:
    """Per command class: None if `version` has no such branch, else the fields it lacks."""
    named = version.schema["__named_schemas"]
    out: dict[type, tuple[tuple[str, Any], ...] | None] = {}
    for cls in commands.COMMAND_TYPES:
        schema = named.get(f"{NAMESPACE}.{cls.__name__}")
        if schema is None:
            out[cls] = None
            continue
        known = {f["name"] for f in schema["fields"]}
        out[cls] = tuple(
            (f.name, f.default) for f in dataclasses.fields(cls) if f.name not in known
        )
    return out


_LACKING = {number: _lacking(v) for number, v in _versions.items()}


def _check_expressible(envelope: Envelope, version: SchemaVersion) -> None:
    """Raise CodecError when `version` cannot carry `envelope` without losing part of it."""
    cmd = envelope.command
    lacking = _LACKING[version.version][type(cmd)]
    if lacking is None:
        raise CodecError(
            f"{type(cmd).__name__} does not exist in schema v{version.version}, the version "
            "the volume has enabled: run tidefs upgrade"
        )
    for name, default in lacking:
        if getattr(cmd, name) != default:
            raise CodecError(
                f"{type(cmd).__name__}.{name} does not exist in schema v{version.version}, the "
                "version the volume has enabled: run tidefs upgrade"
            )


def _encode_with(envelope: Envelope, version: SchemaVersion, *, lossless: bool = True) -> bytes:
    # Checked here, not left to validation: a stray dataclass would otherwise
    # match the first union branch whose fields it satisfies (any dict is a Noop).
    if type(envelope) is not Envelope or type(envelope.command) not in _UNION_NAMES:
        raise CodecError(
            f"envelope does not fit schema: not an Envelope of a command: {envelope!r}"
        )
    if lossless and version is not CURRENT:
        _check_expressible(envelope, version)
    datum = _to_avro(envelope)
    try:
        # Strict: every field must be given; a default fills only what an older
        # version's writer could not express.
        validate(datum, version.schema, raise_errors=True, strict=version is CURRENT)
    except ValidationError as exc:
        detail = "; ".join(str(e)[:300] for e in exc.errors) or str(exc)[:300]
        raise CodecError(f"envelope does not fit schema v{version.version}: {detail}") from exc
    buf = io.BytesIO()
    buf.write(MARKER)
    buf.write(version.fingerprint)
    fastavro.schemaless_writer(buf, version.schema, datum)
    return buf.getvalue()


def encode(envelope: Envelope, version: int | None = None) -> bytes:
    """Return the log record of `envelope`, written with schema `version` (default: current).

    Writers pass the version their volume has enabled (tidefs.journal.features),
    so that every region's tidefs can read the record. Raises CodecError when
    the envelope does not fit that schema (a wrong type, an integer outside the
    signed 64-bit range, a request id not 16 bytes long, a command or a
    non-default field that version lacks, a version this tidefs does not know).
    """
    if version is None:
        return _encode_with(envelope, CURRENT)
    schema = VERSIONS.get(version)
    if schema is None:
        raise CodecError(
            f"schema v{version} is unknown to this tidefs (it writes v{min(VERSIONS)}.."
            f"v{CURRENT_VERSION}): upgrade tidefs"
        )
    return _encode_with(envelope, schema)


def encode_writer(envelope: Envelope, version: int) -> bytes:
    """Return the log record of `envelope` as the tidefs that wrote schema `version` would.

    A test hook: fields that version lacks are dropped, so decoding yields
    their defaults. Raises KeyError for a version not in `VERSIONS`.
    """
    return _encode_with(envelope, VERSIONS[version], lossless=False)


def decode(payload: bytes) -> Envelope:
    """Return the envelope in a log record written by any known schema version.

    Raises UnknownSchemaError for a fingerprint of no known version, and
    CorruptRecordError for anything that is not exactly one well-formed record.
    """
    if len(payload) < HEADER_SIZE:
        raise CorruptRecordError(
            f"record of {len(payload)} bytes is shorter than the {HEADER_SIZE}-byte header"
        )
    if payload[:2] != MARKER:
        raise CorruptRecordError(
            f"record starts with {bytes(payload[:2]).hex()}, not the Avro "
            f"single-object marker {MARKER.hex()}"
        )
    fp = bytes(payload[2:HEADER_SIZE])
    writer = _BY_FINGERPRINT.get(fp)
    if writer is None:
        raise UnknownSchemaError(
            f"record written with unknown schema fingerprint {fp.hex()}: it was written by "
            f"a newer tidefs (this one reads schema versions {min(VERSIONS)}..{max(VERSIONS)}); "
            "upgrade tidefs to read it",
            fingerprint=fp,
        )
    buf = io.BytesIO(payload)
    buf.seek(HEADER_SIZE)
    reader = None if writer is CURRENT else CURRENT.schema
    try:
        datum = fastavro.schemaless_reader(buf, writer.schema, reader, return_record_name=True)
    except Exception as exc:
        # The body is untrusted bytes handed to fastavro, whose failures on bad
        # input are many (EOFError, IndexError, UnicodeDecodeError, ...) and
        # undocumented; each one means the same thing here.
        raise CorruptRecordError(
            f"record body is not a valid schema v{writer.version} envelope: {exc!r}"
        ) from exc
    if buf.tell() != len(payload):
        raise CorruptRecordError(
            f"record has {len(payload) - buf.tell()} trailing bytes after the envelope"
        )
    envelope: Envelope = _to_envelope(datum)
    return envelope
