"""Tests of tidefs.journal.codec: round trips, the record header, schema evolution, bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import struct
import time
from collections.abc import Callable
from typing import Any

import fastavro
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.strategies import envelopes
from tidefs.journal import codec
from tidefs.journal.codec import CodecError, CorruptRecordError, UnknownSchemaError
from tidefs.journal.commands import (
    COMMAND_TYPES,
    NAME_MAX,
    Command,
    CommitSlice,
    CompactChunk,
    CreateVolume,
    EnableFeatures,
    Envelope,
    Mkdir,
    Mknod,
    Noop,
    Region,
    RemoveRegion,
    Rename,
    Rmdir,
    SetAttr,
    SliceRef,
    Unlink,
)
from tidefs.journal.log import JournalError

LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
T0 = 1_700_000_000_000_000_000


def rabin64(data: bytes) -> int:
    """CRC-64-AVRO as the Avro specification writes it, independent of fastavro."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def env(command: Any, **kw: Any) -> Envelope:
    kw.setdefault("request_id", bytes(range(16)))
    return Envelope(command, origin=kw.pop("origin", "eu-west"), timestamp_ns=T0, **kw)


# -- round trips ----------------------------------------------------------------


@given(envelopes())
@example(env(Noop()))
@example(env(Noop("\x00é😀"), origin=""))
@example(env(Unlink(LONG_MIN, b"")))
@example(env(Rmdir(LONG_MAX, b"\x00\xff/." * 64)))
@example(env(Mknod(1, b"\xff" * NAME_MAX, 0o100644, 2**32 - 1, 2**32 - 1, 0, False)))
@example(env(SetAttr(7)))
@example(env(SetAttr(7, 0, 0, 0, 0, LONG_MIN, LONG_MAX, True, True)))
@example(env(CreateVolume("v", (), "")))
@example(env(CommitSlice(5, 0, SliceRef(LONG_MAX, 0, 0, 1, "eu"), truncate_to=0)))
@example(env(CompactChunk(5, 3, (), SliceRef(-1, 0, 1 << 26, 1 << 22, "us"))))
def test_round_trip(envelope: Envelope) -> None:
    payload = codec.encode(envelope)
    assert payload[:2] == codec.MARKER
    assert payload[2 : codec.HEADER_SIZE] == codec.CURRENT_FINGERPRINT
    decoded = codec.decode(payload)
    # Dataclass equality also proves arrays came back as tuples: () != [].
    assert decoded == envelope
    assert type(decoded.command) is type(envelope.command)


@pytest.mark.parametrize("cls", COMMAND_TYPES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_round_trip_each_command_type(cls: type, data: st.DataObject) -> None:
    envelope = data.draw(envelopes(cls))
    assert codec.decode(codec.encode(envelope)) == envelope


def test_same_fields_different_commands_keep_their_type() -> None:
    assert type(codec.decode(codec.encode(env(Unlink(1, b"a")))).command) is Unlink
    assert type(codec.decode(codec.encode(env(Rmdir(1, b"a")))).command) is Rmdir


@pytest.mark.parametrize(
    "envelope",
    [
        env(Unlink(2**63, b"a")),
        env(Unlink(LONG_MIN - 1, b"a")),
        env(Unlink(1, "a")),  # type: ignore[arg-type]
        env(Unlink(1.5, b"a")),  # type: ignore[arg-type]
        env(SetAttr(1, atime_now=2)),  # type: ignore[arg-type]
        env(Unlink(1, b"a"), request_id=bytes(15)),
        env(Unlink(1, b"a"), origin=b"eu"),
        env(Region("eu", "s3://x")),
        env("unlink a"),
    ],
    ids=[
        "long-overflow",
        "long-underflow",
        "str-name",
        "float",
        "int-as-bool",
        "short-request-id",
        "bytes-origin",
        "not-a-command",
        "not-a-dataclass",
    ],
)
def test_encode_rejects_values_outside_the_schema(envelope: Envelope) -> None:
    with pytest.raises(CodecError, match="does not fit schema"):
        codec.encode(envelope)


# -- the record header --------------------------------------------------------------

GOLDEN_FINGERPRINT = "3514584cdce456bd"
"""CURRENT_FINGERPRINT, pinned: records in logs out there carry it."""

RELEASE_HINT = (
    "envelope.avsc changed: release it as schemas/history/envelope.vN.avsc (keep every "
    "older file), then update GOLDEN_FINGERPRINT and the golden record"
)

GOLDEN_MKNOD = env(Mknod(1, b"train.parquet", 0o100644, 1000, 1000, exclusive=False))
GOLDEN_MKNOD_V1 = bytes.fromhex(
    "c301" + "62a766427262b211" + "000102030405060708090a0b0c0d0e0f0e65752d77657374"
    "8080d0e2c6bfce972f04021a747261696e2e70617271756574c88604d00fd00f0000"
)
GOLDEN_MKNOD_V2 = bytes.fromhex(
    "c301" + "3514584cdce456bd" + "000102030405060708090a0b0c0d0e0f0e65752d77657374"
    "8080d0e2c6bfce972f04021a747261696e2e70617271756574c88604d00fd00f0000"
)


@pytest.mark.parametrize(
    ("schema", "spec_fingerprint"),
    [
        # Published in Avro's share/test/data/schema-tests.txt as signed longs.
        ("null", 7195948357588979594),
        ("int", 8247732601305521295),
        ("long", -3434872931120570953),
        ("string", -8142146995180207161),
    ],
)
def test_fingerprint_matches_the_avro_spec(schema: str, spec_fingerprint: int) -> None:
    assert rabin64(json.dumps(schema).encode()) == spec_fingerprint % 2**64
    # The spec puts the fingerprint in the header little-endian.
    assert codec.schema_fingerprint(schema) == struct.pack("<q", spec_fingerprint)


def test_current_fingerprint_is_pinned() -> None:
    canonical = codec.CURRENT.canonical_form.encode()
    assert struct.pack("<Q", rabin64(canonical)) == codec.CURRENT_FINGERPRINT
    assert codec.CURRENT_FINGERPRINT.hex() == GOLDEN_FINGERPRINT, RELEASE_HINT


def test_golden_record() -> None:
    assert codec.encode(GOLDEN_MKNOD) == GOLDEN_MKNOD_V2
    assert codec.decode(GOLDEN_MKNOD_V2) == GOLDEN_MKNOD


def test_golden_record_at_an_older_version() -> None:
    """A volume at schema v1 gets records a tidefs of schema v1 wrote, byte for byte."""
    assert codec.encode(GOLDEN_MKNOD, 1) == GOLDEN_MKNOD_V1
    assert codec.decode(GOLDEN_MKNOD_V1) == GOLDEN_MKNOD


@pytest.mark.parametrize(
    "command",
    [RemoveRegion("c"), EnableFeatures(2, ("region_remove",))],
    ids=["new-branch", "enable-features"],
)
def test_encode_at_an_older_version_refuses_what_it_lacks(command: Command) -> None:
    """Dropping a command or a field would lose it silently: encode refuses instead."""
    with pytest.raises(CodecError, match=r"does not exist in schema v1.*tidefs upgrade"):
        codec.encode(env(command), 1)
    assert codec.decode(codec.encode(env(command), 2)).command == command


def test_encode_at_an_older_version_refuses_a_non_default_new_field() -> None:
    """Mknod.exclusive came with v1: a v0 record can carry only its default."""
    assert codec.decode(codec.encode(env(Mknod(1, b"a", 0o100644, 0, 0)), 0)).command.exclusive
    with pytest.raises(CodecError, match=r"Mknod\.exclusive does not exist in schema v0"):
        codec.encode(env(Mknod(1, b"a", 0o100644, 0, 0, exclusive=False)), 0)


def test_encode_at_an_unknown_version() -> None:
    with pytest.raises(CodecError, match="schema v99 is unknown to this tidefs"):
        codec.encode(env(Noop()), 99)


# -- schema versions ---------------------------------------------------------------

GOLDEN_V0_RECORDS = [
    # Written by schema v0, which had neither Mknod.exclusive nor CreateVolume.retention_s.
    (
        "c3017d2eec7681652331000102030405060708090a0b0c0d0e0f0e65752d77657374"
        "8080d0e2c6bfce972f04021a747261696e2e70617271756574c88604d00fd00f00",
        env(Mknod(1, b"train.parquet", 0o100644, 1000, 1000, exclusive=True)),
    ),
    (
        "c3017d2eec7681652331101112131415161718191a1b1c1d1e1f0e65752d77657374"
        "8080d0e2c6bfce972f00106461746173657473040e65752d776573742e73333a2f2f"
        "7469646566732d65752f64617461736574730e75732d656173742e73333a2f2f74696465"
        "66732d75732f6461746173657473000e65752d776573748080804080808004da87020000",
        env(
            CreateVolume(
                "datasets",
                (
                    Region("eu-west", "s3://tidefs-eu/datasets"),
                    Region("us-east", "s3://tidefs-us/datasets"),
                ),
                "eu-west",
            ),
            request_id=bytes(range(16, 32)),
        ),
    ),
]


def test_history_is_complete() -> None:
    versions = list(codec.VERSIONS)
    assert versions == list(range(len(versions))), "history versions are numbered 0..N"
    newest = codec.VERSIONS[versions[-1]]
    assert newest is codec.CURRENT, RELEASE_HINT
    fingerprints = [v.fingerprint for v in codec.VERSIONS.values()]
    assert len(set(fingerprints)) == len(fingerprints), "two history files hold the same schema"


GOLDEN_V1_RECORDS = [(GOLDEN_MKNOD_V1.hex(), GOLDEN_MKNOD)]


@pytest.mark.parametrize(("hex_record", "expected"), GOLDEN_V0_RECORDS + GOLDEN_V1_RECORDS)
def test_golden_v0_records_decode(hex_record: str, expected: Envelope) -> None:
    assert codec.decode(bytes.fromhex(hex_record)) == expected


def _record_fields(version: int) -> dict[str, dict[str, Any]]:
    """Return, per record name, that version's fields by name."""
    named = codec.VERSIONS[version].schema["__named_schemas"]
    return {
        name: {f["name"]: f for f in schema["fields"]}
        for name, schema in named.items()
        if schema["type"] == "record"
    }


def _as_of(value: Any, version: int) -> Any:
    """Return `value` as a writer of `version` could express it: other fields at their defaults."""
    if isinstance(value, tuple):
        return tuple(_as_of(v, version) for v in value)
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    known = _record_fields(version)[f"tidefs.{type(value).__name__}"]
    changes = {}
    for f in dataclasses.fields(value):
        if f.name in known:
            changes[f.name] = _as_of(getattr(value, f.name), version)
        else:
            assert f.default is not dataclasses.MISSING, f"{f.name} lacks a default"
            changes[f.name] = f.default
    return dataclasses.replace(value, **changes)


def _as_datum(value: Any, version: int) -> Any:
    """Return `value` as fastavro reads it with the schema of `version`, other fields dropped."""
    if isinstance(value, tuple):
        return [_as_datum(v, version) for v in value]
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    name = f"tidefs.{type(value).__name__}"
    known = _record_fields(version)[name]
    datum = {n: _as_datum(getattr(value, n), version) for n in known}
    return (name, datum) if type(value) in COMMAND_TYPES else datum


@given(envelopes())
def test_old_versions_decode_with_the_current_reader(envelope: Envelope) -> None:
    for version in codec.VERSIONS:
        if f"tidefs.{type(envelope.command).__name__}" not in _branches(version):
            continue  # a command that version does not have
        payload = codec.encode_writer(envelope, version)
        assert payload[2 : codec.HEADER_SIZE] == codec.VERSIONS[version].fingerprint
        assert codec.decode(payload) == _as_of(envelope, version)


VERSION_PAIRS = [
    (old, new) for old, new in itertools.product(codec.VERSIONS, repeat=2) if old <= new
]
"""(older, newer) version pairs, each version with itself included."""


def _branches(version: int) -> list[str]:
    """Return the names of the envelope's command union branches in `version`, in order."""
    schema = codec.VERSIONS[version].schema
    (command,) = [f for f in schema["fields"] if f["name"] == "command"]
    return [b if isinstance(b, str) else b["name"] for b in command["type"]]


@pytest.mark.parametrize(("writer", "reader"), VERSION_PAIRS, ids=lambda v: f"v{v}")
@pytest.mark.parametrize("cls", COMMAND_TYPES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_backward_transitive_compatibility(
    writer: int, reader: int, cls: type, data: st.DataObject
) -> None:
    """Every version reads what every older one (and itself) wrote, through fastavro's resolution.

    Each command type is drawn on its own because fastavro resolves lazily: a
    union branch that is never written is never checked. A command that the
    writer's version does not have cannot be written by it.
    """
    if f"tidefs.{cls.__name__}" not in _branches(writer):
        return
    envelope = data.draw(envelopes(cls))
    payload = codec.encode_writer(envelope, writer)
    buf = io.BytesIO(payload[codec.HEADER_SIZE :])
    datum = fastavro.schemaless_reader(
        buf,
        codec.VERSIONS[writer].schema,
        codec.VERSIONS[reader].schema,
        return_record_name=True,
    )
    assert buf.tell() == len(payload) - codec.HEADER_SIZE
    assert datum == _as_datum(_as_of(envelope, writer), reader)


def _type_key(schema: Any) -> Any:
    """Return a comparable form of a field type in which a named type is its name."""
    if isinstance(schema, list):
        return [_type_key(s) for s in schema]
    if isinstance(schema, dict):
        if "name" in schema:
            return schema["name"]
        return {k: _type_key(v) for k, v in schema.items() if k in ("type", "items", "values")}
    return schema


@pytest.mark.parametrize(("old", "new"), VERSION_PAIRS, ids=lambda v: f"v{v}")
def test_versions_differ_only_in_fields_with_defaults(old: int, new: int) -> None:
    """The static side of BACKWARD_TRANSITIVE: what resolution needs, for every record of a pair.

    Records are never removed and union branches only appended, so an older
    record's union index means the same command in every newer version; a
    field is added or removed only with a default.
    """
    old_records, new_records = _record_fields(old), _record_fields(new)
    assert old_records.keys() <= new_records.keys(), "records are never removed"
    assert _branches(new)[: len(_branches(old))] == _branches(old), (
        "union branches are only appended"
    )
    for name, old_fields in old_records.items():
        new_fields = new_records[name]
        for field_name in old_fields.keys() ^ new_fields.keys():
            field = new_fields.get(field_name) or old_fields[field_name]
            assert "default" in field, (
                f"{name}.{field_name} is in one version only and lacks a default"
            )
        for field_name in old_fields.keys() & new_fields.keys():
            if (name, field_name) == ("tidefs.Envelope", "command"):
                continue  # the union, checked above: branches are appended
            assert _type_key(old_fields[field_name]["type"]) == _type_key(
                new_fields[field_name]["type"]
            ), f"{name}.{field_name} changed type"


def test_an_older_reader_cannot_read_a_newer_command() -> None:
    """Why the versions are not FULL_TRANSITIVE, and so why writers use the volume's version."""
    payload = codec.encode(env(RemoveRegion("c")))
    with pytest.raises(Exception):  # noqa: B017 - fastavro's error for an unknown branch
        fastavro.schemaless_reader(
            io.BytesIO(payload[codec.HEADER_SIZE :]),
            codec.CURRENT.schema,
            codec.VERSIONS[1].schema,
            return_record_name=True,
        )


def test_schema_defaults_are_the_dataclass_defaults() -> None:
    """An old record's missing field is filled from the schema: it must mean what the class says."""
    classes = {cls.__name__: cls for cls in (*COMMAND_TYPES, Region, SliceRef, Envelope)}
    records = _record_fields(codec.CURRENT_VERSION)
    assert {name.rpartition(".")[2] for name in records} == classes.keys()
    for name, fields in records.items():
        cls = classes[name.rpartition(".")[2]]
        members = {f.name: f for f in dataclasses.fields(cls)}
        assert members.keys() == fields.keys(), name
        for field_name, field in fields.items():
            default = members[field_name].default
            if default is dataclasses.MISSING:
                assert "default" not in field, f"{name}.{field_name}"
            else:
                assert field.get("default", dataclasses.MISSING) == default, f"{name}.{field_name}"


# -- bad input ---------------------------------------------------------------------


def test_errors_belong_to_the_journal_hierarchy() -> None:
    assert issubclass(UnknownSchemaError, CodecError)
    assert issubclass(CorruptRecordError, CodecError)
    assert issubclass(CodecError, JournalError)
    # The replica re-raises `type(exc)(message)` with the offset prepended.
    for cls in (CodecError, UnknownSchemaError, CorruptRecordError):
        assert str(cls("record at offset 7: x")) == "record at offset 7: x"


def test_unknown_fingerprint_is_named() -> None:
    fp = bytes.fromhex("0123456789abcdef")
    payload = codec.MARKER + fp + GOLDEN_MKNOD_V1[codec.HEADER_SIZE :]
    with pytest.raises(UnknownSchemaError, match="0123456789abcdef") as info:
        codec.decode(payload)
    assert info.value.fingerprint == fp
    assert "newer tidefs" in str(info.value)
    assert "upgrade" in str(info.value)


def test_big_endian_fingerprint_is_unknown() -> None:
    swapped = codec.MARKER + codec.CURRENT_FINGERPRINT[::-1] + GOLDEN_MKNOD_V1[codec.HEADER_SIZE :]
    with pytest.raises(UnknownSchemaError):
        codec.decode(swapped)


@pytest.mark.parametrize("marker", [b"\x00\x00", b"\xc3\x00", b"\xc3\x02", b"\x01\xc3", b"Ob"])
def test_wrong_marker(marker: bytes) -> None:
    with pytest.raises(CorruptRecordError, match="marker"):
        codec.decode(marker + GOLDEN_MKNOD_V1[2:])


def test_trailing_bytes() -> None:
    for tail in (b"\x00", b"\xc3\x01", GOLDEN_MKNOD_V1):
        with pytest.raises(CorruptRecordError, match="trailing"):
            codec.decode(GOLDEN_MKNOD_V1 + tail)


@given(envelopes(), st.data())
def test_every_truncation_is_corrupt(envelope: Envelope, data: st.DataObject) -> None:
    payload = codec.encode(envelope)
    cut = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    with pytest.raises(CorruptRecordError):
        codec.decode(payload[:cut])


def test_every_truncation_of_the_golden_record_is_corrupt() -> None:
    for cut in range(len(GOLDEN_MKNOD_V1)):
        with pytest.raises(CorruptRecordError):
            codec.decode(GOLDEN_MKNOD_V1[:cut])


@given(st.binary())
@example(b"")
@example(b"\xc3\x01")
def test_garbage_is_rejected_by_type(payload: bytes) -> None:
    with contextlib.suppress(CodecError):  # and no other exception
        codec.decode(payload)


@given(st.sampled_from(list(codec.VERSIONS.values())), st.binary())
@example(codec.CURRENT, b"")
@example(codec.CURRENT, bytes(16) + b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f")  # huge origin length
@example(codec.CURRENT, bytes(16) + b"\x00\x00\x7f")  # union index far out of range
@example(codec.CURRENT, bytes(16) + b"\x02\xff\xfe\x00")  # origin not UTF-8
def test_garbage_after_a_known_header_is_corrupt_or_an_envelope(
    version: codec.SchemaVersion, body: bytes
) -> None:
    try:
        decoded = codec.decode(codec.MARKER + version.fingerprint + body)
    except CorruptRecordError:
        return
    # Avro has no checksum: a body may happen to be valid, but then as a whole.
    assert type(decoded.command) in COMMAND_TYPES
    assert codec.decode(codec.encode_writer(decoded, version.version)) == decoded


# -- speed -------------------------------------------------------------------------


def _realistic_mix(n: int) -> list[Envelope]:
    """A day of a training cluster's metadata, roughly: mostly slices, creates and renames."""
    shapes: list[Callable[[int], Command]] = [
        lambda i: CommitSlice(100 + i, i % 16, SliceRef(i * 7919, 0, 1 << 20, 4 << 20, "us-east")),
        lambda i: CommitSlice(100 + i, 0, SliceRef(i, 0, 4 << 20, 4 << 20, "eu-west"), 0),
        lambda i: Mknod(100 + i, b"part-%05d.parquet" % i, 0o100644, 1000, 1000),
        lambda i: SetAttr(100 + i, mtime=T0 + i, atime=T0 + i),
        lambda i: Rename(100 + i, b"ckpt.tmp", 7, b"step-%d.safetensors" % i),
        lambda i: Unlink(100 + i, b"shard-%d" % i),
        lambda i: Mkdir(100 + i, b"run-%d" % i, 0o40755, 1000, 1000),
        lambda i: CompactChunk(
            100 + i, 0, tuple(range(i % 12)), SliceRef(i, 0, 1 << 26, 1 << 22, "us")
        ),
    ]
    return [Envelope(shapes[i % len(shapes)](i), "us-east", T0 + i, bytes(16)) for i in range(n)]


@pytest.mark.slow
def test_decode_rate_is_well_above_the_fold_budget() -> None:
    payloads = [codec.encode(e) for e in _realistic_mix(20_000)]
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for payload in payloads:
            codec.decode(payload)
        best = max(best, len(payloads) / (time.perf_counter() - start))
    print(f"decode: {best:,.0f} records/s")
    assert best > 20_000, f"decode {best:,.0f}/s is below the fold's 20,000 records/s"
