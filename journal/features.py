"""Features: what a volume's log may use, enabled in the log itself, and known by this tidefs.

A new command or field cannot be read by an older tidefs (its record carries
a schema fingerprint the older one does not know), so the envelope's versions
are BACKWARD_TRANSITIVE only: every tidefs reads every older record. To keep
older readers working on a volume, writers encode every record with the
schema version the *volume* has enabled, not the newest this tidefs knows,
and use a feature (a new command, or a new field set to something other than
its default) only once the volume has enabled it. `EnableFeatures`, appended
by `tidefs upgrade` after every region runs a tidefs that knows it (and by
`format` for everything its tidefs knows), raises the volume's level.

A tidefs that meets an `EnableFeatures` naming a schema version or feature it
does not know stops its fold just before that record (`check_known`), as it
does before a record of an unknown fingerprint, and keeps serving the state
it has; the message names what to upgrade.

`FEATURES` is the one registry: a feature is one line naming the schema
version that introduced it and the command (and field) that uses it. Entries
are never changed once released, so every tidefs that knows a feature agrees
on what it means; adding one is adding a line. A feature is always a command
or field that its schema version added: an older tidefs cannot even decode a
record that uses it, so the fold's check (a command using a feature the
volume has not enabled is refused, EOPNOTSUPP) is the same in every tidefs
that folds the record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from tidefs.journal import codec
from tidefs.journal.commands import (
    Command,
    CommitSlice,
    EnableFeatures,
    Envelope,
    RemoveRegion,
)

LEGACY_SCHEMA = 1
"""The level of a volume whose log holds no EnableFeatures (formatted before there were any)."""

FIRST_FEATURE_SCHEMA = 2
"""The schema version that introduced EnableFeatures: enabling anything needs it."""


@dataclass(frozen=True, slots=True)
class Feature:
    """A capability records may use once the volume enables it.

    A command uses the feature when it is of type `command` and, if `field` is
    named, that field differs from its default (an older tidefs's value).
    """

    name: str
    schema_version: int
    """The first schema version in which records using it can be written."""
    command: type
    field: str | None = None
    doc: str = ""

    def used_by(self, command: Command) -> bool:
        """Whether `command` uses this feature."""
        if type(command) is not self.command:
            return False
        return self.field is None or getattr(command, self.field) != _DEFAULTS[self]


APPEND = "append"
"""The feature of CommitSlice.append: an O_APPEND write lands where the fold finds the end."""

FEATURES: tuple[Feature, ...] = (
    Feature("region_remove", 2, RemoveRegion, doc="tidefs region remove (RemoveRegion)"),
    Feature(APPEND, 2, CommitSlice, "append", doc="O_APPEND writes placed by the fold"),
)
"""Every feature this tidefs knows, oldest first; one line each, never edited once released."""

BY_NAME: Mapping[str, Feature] = MappingProxyType({f.name: f for f in FEATURES})
KNOWN: frozenset[str] = frozenset(BY_NAME)
"""The names of every feature this tidefs knows (published in its status reports)."""

_DEFAULTS: dict[Feature, Any] = {
    f: {d.name: d.default for d in dataclasses.fields(f.command)}[f.field]
    for f in FEATURES
    if f.field is not None
}
_BY_COMMAND: dict[type, tuple[Feature, ...]] = {}
for _f in FEATURES:
    _BY_COMMAND[_f.command] = (*_BY_COMMAND.get(_f.command, ()), _f)


@dataclass(frozen=True, slots=True)
class Enabled:
    """What a volume has enabled: the schema version writers encode with, and the features."""

    schema_version: int = LEGACY_SCHEMA
    features: frozenset[str] = frozenset()

    def describe(self) -> str:
        """One line for humans: "schema v2, features: region_remove"."""
        names = ", ".join(sorted(self.features)) or "none"
        return f"schema v{self.schema_version}, features: {names}"


LEGACY = Enabled()


class UnknownFeatureError(codec.CodecError):
    """A record enables a schema version or feature this tidefs does not know (a newer writer)."""


def not_enabled(feature: Feature, volume: str) -> str:
    """The one line that says a command needs `feature` and how to enable it on `volume`."""
    return (
        f"{feature.command.__name__} needs the feature {feature.name!r}, which volume {volume} "
        f"has not enabled: once every region runs a tidefs that knows it (tidefs status), run "
        f"tidefs upgrade {volume} --journal URL"
    )


def used(command: Command) -> tuple[Feature, ...]:
    """Return the features `command` uses (on the hot path: one dict lookup for most commands)."""
    candidates = _BY_COMMAND.get(type(command))
    if candidates is None:
        return ()
    return tuple(f for f in candidates if f.used_by(command))


def missing(command: Command, enabled: Enabled) -> Feature | None:
    """Return a feature `command` uses that `enabled` lacks, or None."""
    for f in used(command):
        if f.name not in enabled.features or f.schema_version > enabled.schema_version:
            return f
    return None


def write_version(command: Command, enabled: Enabled) -> int:
    """Return the schema version a record of `command` is encoded with on a volume at `enabled`.

    Everything is written at the volume's level, except EnableFeatures, which is
    written at the level it enables (it is the record that raises it).
    """
    if isinstance(command, EnableFeatures):
        return max(FIRST_FEATURE_SCHEMA, command.schema_version)
    return enabled.schema_version


def unknown(command: EnableFeatures) -> tuple[int | None, tuple[str, ...]]:
    """Return (the schema version if this tidefs does not know it, the unknown feature names)."""
    version = command.schema_version if command.schema_version > codec.CURRENT_VERSION else None
    return version, tuple(sorted(set(command.features) - KNOWN))


def check_known(env: Envelope) -> None:
    """Raise UnknownFeatureError when `env` enables something this tidefs does not know."""
    if not isinstance(env.command, EnableFeatures):
        return
    version, names = unknown(env.command)
    if version is None and not names:
        return
    what = " and ".join(
        part
        for part in (
            f"schema v{version}" if version is not None else "",
            f"feature(s) {', '.join(names)}" if names else "",
        )
        if part
    )
    raise UnknownFeatureError(
        f"the volume enables {what}, which this tidefs {_own_version()} does not know "
        f"(it knows schema v{codec.CURRENT_VERSION}, features: {', '.join(sorted(KNOWN)) or 'none'}"
        "): upgrade tidefs in this region to read on"
    )


def _own_version() -> str:
    from tidefs import __version__

    return __version__


def enable_up_to(schema_version: int) -> EnableFeatures | None:
    """The command enabling `schema_version` and every feature up to it (None: the legacy level).

    Raises ValueError for a version this tidefs does not write.
    """
    if not LEGACY_SCHEMA <= schema_version <= codec.CURRENT_VERSION:
        raise ValueError(
            f"schema version {schema_version} is not one this tidefs writes "
            f"({LEGACY_SCHEMA}..{codec.CURRENT_VERSION})"
        )
    if schema_version < FIRST_FEATURE_SCHEMA:
        return None
    names = sorted(f.name for f in FEATURES if f.schema_version <= schema_version)
    return EnableFeatures(schema_version, tuple(names))


def enable_all() -> EnableFeatures:
    """The command that enables everything this tidefs knows (what `format` appends)."""
    enable = enable_up_to(codec.CURRENT_VERSION)
    assert enable is not None  # this tidefs writes schema v2 at least
    return enable
