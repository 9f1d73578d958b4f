"""Hypothesis strategies for tidefs log records: commands and envelopes.

The strategies are built from the current Avro schema, so a field or command
added there is generated here without touching this file. Values span each
Avro type's whole range (longs from -2**63 to 2**63 - 1, empty and non-UTF-8
names, any Unicode text): what the codec must carry, not what the fold would
accept. Tests of the fold that want plausible operations should narrow them,
e.g. `commands_of(Mkdir).filter(...)`, or build their own.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tidefs.journal import codec, commands
from tidefs.journal.commands import COMMAND_TYPES, Command, Envelope

LONGS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
"""Every value of an Avro long: the range of every integer in a command."""

_PRIMITIVES: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "long": LONGS,
    "bytes": st.binary(),
    "string": st.text(),
}


def _for_schema(schema: Any, named: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Return a strategy for the dataclass values of one Avro type."""
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return _PRIMITIVES[schema]
        schema = named[schema]
    if isinstance(schema, list):
        return st.one_of([_for_schema(branch, named) for branch in schema])
    kind = schema["type"]
    if kind == "array":
        return st.lists(_for_schema(schema["items"], named), max_size=5).map(tuple)
    if kind == "fixed":
        return st.binary(min_size=schema["size"], max_size=schema["size"])
    if kind == "record":
        cls = getattr(commands, schema["name"].rpartition(".")[2])
        fields = {f["name"]: _for_schema(f["type"], named) for f in schema["fields"]}
        return st.builds(cls, **fields)
    raise TypeError(f"no strategy for Avro type {kind!r}")


_NAMED: dict[str, Any] = codec.CURRENT.schema["__named_schemas"]


def commands_of(*types: type) -> st.SearchStrategy[Command]:
    """Return a strategy for commands of the given classes (every command class if none)."""
    chosen = types or COMMAND_TYPES
    return st.one_of([_for_schema(f"{codec.NAMESPACE}.{cls.__name__}", _NAMED) for cls in chosen])


def envelopes(*types: type) -> st.SearchStrategy[Envelope]:
    """Return a strategy for envelopes carrying commands of the given classes (all if none)."""
    fields = {f["name"]: _for_schema(f["type"], _NAMED) for f in codec.CURRENT.schema["fields"]}
    fields["command"] = commands_of(*types)
    return st.builds(Envelope, **fields)
