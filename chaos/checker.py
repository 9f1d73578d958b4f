"""Check a chaos history against what every region shows after heal.

The expected tree follows from each writer's operations, replayed in order.
Because a writer's operations are sequential and touch only its directory,
each path ends as one of a small set of possibilities: exactly the last
acknowledged value when everything after it is acknowledged too, or also any
value (or absence) that an unknown operation may or may not have produced.
The sets are a sound over-approximation: they never reject a correct tree.

Invariants (numbers as in the issue):
1. every region's tree is one the history allows: every acknowledged put,
   rename and unlink is reflected, nothing appears that nobody wrote, and no
   value appears at two paths ("nothing unacknowledged appears twice");
2. (digests: checked by the runner, which reads the states);
3. every read returned an allowed value or a clean error, never other bytes,
   and a read at the writing region never missed that region's acknowledged
   write (read-your-writes; other regions may lag, so they are held to
   "a value that was there", not to the newest);
4. (convergence time: measured by the runner);
5. the shared append log holds every acknowledged append exactly once, no
   line twice and nothing nobody appended, each region's lines in the order
   it appended them, and the same bytes in every region.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from chaos.history import APPEND_LOG, OK, UNKNOWN, History, Lineage, Op, append_line, op_id_of

ABSENT = ""


@dataclass
class Verdict:
    """What the checker found; `ok` when no invariant is violated."""

    acknowledged: int = 0
    unknown: int = 0
    failed: int = 0
    reads: int = 0
    reads_wrong: int = 0
    reads_failed: int = 0
    reads_fresh_checked: int = 0  # reads held to read-your-writes
    lost: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def expected(history: History, region: str) -> dict[str, set[str]]:
    """Replay `region`'s writer: path -> the op ids (or ABSENT) it may hold at the end."""
    poss: dict[str, set[str]] = {}
    for op in history.writes(region):
        if op.status not in (OK, UNKNOWN):
            continue
        definite = op.status == OK
        if op.kind == "put":
            here = {op.op_id}
            poss[op.path] = here if definite else poss.get(op.path, {ABSENT}) | here
        elif op.kind == "rename":
            if op.path == op.target:
                continue
            moved = set(poss.get(op.path, {ABSENT}))
            if definite:
                poss[op.target] = moved
                poss[op.path] = {ABSENT}
            else:
                poss[op.target] = poss.get(op.target, {ABSENT}) | moved
                poss[op.path] = poss.get(op.path, {ABSENT}) | {ABSENT}
        elif op.kind == "unlink":
            poss[op.path] = {ABSENT} if definite else poss.get(op.path, {ABSENT}) | {ABSENT}
    return poss


def read_tree(root: Path, regions: list[str]) -> dict[str, str]:
    """Return path -> op id (or a description of wrong bytes) of every writer's files."""
    out: dict[str, str] = {}
    for region in regions:
        d = root / f"w-{region}"
        for name in sorted(os.listdir(d)):
            rel = f"w-{region}/{name}"
            data = (d / name).read_bytes()
            out[rel] = op_id_of(data) or f"<{len(data)} wrong bytes>"
    return out


def check_tree(history: History, tree: dict[str, str], regions: list[str], where: str) -> list[str]:
    """Return the violations of invariant 1 in one region's tree."""
    problems: list[str] = []
    allowed: dict[str, set[str]] = {}
    for region in regions:
        allowed.update(expected(history, region))
    status = {op.op_id: op.status for op in history.writes()}
    for path in sorted(set(allowed) | set(tree)):
        actual = tree.get(path, ABSENT)
        ok_values = allowed.get(path, {ABSENT})
        if actual not in ok_values:
            shown = ", ".join(sorted(v or "absent" for v in ok_values))
            problems.append(
                f"{where}: {path} holds {actual or 'nothing'} "
                f"({status.get(actual, 'no such write') if actual else ''}), expected one of {shown}"
            )
    seen: dict[str, str] = {}
    for path, op_id in tree.items():
        if op_id in seen:
            problems.append(f"{where}: value {op_id} appears twice: {seen[op_id]} and {path}")
        seen[op_id] = path
    return problems


def read_appends(root: Path) -> bytes:
    """Return the shared append log as one region shows it (empty when missing)."""
    try:
        return (root / APPEND_LOG).read_bytes()
    except FileNotFoundError:
        return b""


def check_appends(history: History, logs: dict[str, bytes]) -> list[str]:
    """Return the violations of invariant 5 in every region's copy of the append log."""
    problems: list[str] = []
    ops = {append_line(op.op_id): op for op in history.writes() if op.kind == "append"}
    order = {line: i for i, line in enumerate(ops)}  # invocation order: per region, its order
    for where, data in sorted(logs.items()):
        lines = data.splitlines(keepends=True)
        seen: set[bytes] = set()
        last: dict[str, int] = {}
        for line in lines:
            op = ops.get(line)
            if op is None or op.status not in (OK, UNKNOWN):
                problems.append(f"region {where}: {APPEND_LOG} holds {line[:80]!r}, never appended")
                continue
            if line in seen:
                problems.append(f"region {where}: {APPEND_LOG} holds {op.op_id} twice")
            seen.add(line)
            if order[line] < last.get(op.region, -1):
                problems.append(
                    f"region {where}: {op.op_id} comes after a later append of its region"
                )
            last[op.region] = order[line]
        lost = [op.op_id for line, op in ops.items() if op.status == OK and line not in seen]
        if lost:
            problems.append(
                f"region {where}: {len(lost)} acknowledged appends missing, e.g. {lost[:3]}"
            )
    if len(set(logs.values())) > 1:
        problems.append(f"the regions' {APPEND_LOG} differ")
    return problems


def _touches(op: Op, path: str) -> bool:
    return op.path == path or (op.kind == "rename" and op.target == path)


def stale_reads(history: History) -> tuple[int, list[Op]]:
    """Return (reads checked, stale reads): reads at the writing region that missed its write.

    Read-your-writes, as the writing region promises it: a read of path P in region R's own directory, at region R, that began
    after R's writer was acknowledged for the last operation on P, with no
    other operation on P in flight before the read ended, must see exactly
    what that operation left: the value of a put, nothing after an unlink or
    a rename away. (Renames into P and reads at other regions are not
    checked here: the first needs the whole lineage, the second may lag.)
    """
    writes = history.writes()
    out = []
    checked = 0
    for read in history.reads():
        if read.status != OK or not read.path.startswith(f"w-{read.region}/"):
            continue
        touching = [w for w in writes if _touches(w, read.path) and w.start < read.end]
        if not touching:
            continue
        last = touching[-1]
        if last.status != OK or last.end > read.start:
            continue
        want: str | None
        if last.kind == "put":
            want = last.op_id
        elif last.kind == "unlink" or (last.kind == "rename" and last.path == read.path):
            want = "" if last.path != last.target else None
        else:
            want = None
        if want is None:
            continue
        checked += 1
        if read.seen != want:
            out.append(read)
    return checked, out


def check(
    history: History,
    lineage: Lineage,
    trees: dict[str, dict[str, str]],
    appends: dict[str, bytes] | None = None,
) -> Verdict:
    """Check the history's reads (invariant 3), every region's final tree (invariant 1)
    and, when given, every region's append log (invariant 5)."""
    v = Verdict()
    writes = history.writes()
    v.acknowledged = sum(op.status == OK for op in writes)
    v.unknown = sum(op.status == UNKNOWN for op in writes)
    v.failed = len(writes) - v.acknowledged - v.unknown
    for op in history.reads():
        v.reads += 1
        if op.status != OK:
            v.reads_failed += 1
            continue
        if op.seen and not lineage.allows(op.path, op.seen):
            v.reads_wrong += 1
            if v.reads_wrong <= 5:
                v.problems.append(f"read at {op.region} of {op.path} returned {op.seen}")
    v.reads_fresh_checked, stale = stale_reads(history)
    for op in stale:
        v.reads_wrong += 1
        if v.reads_wrong <= 5:
            v.problems.append(
                f"read at {op.region} of {op.path} returned {op.seen or 'nothing'} after its "
                "own region acknowledged a later write (read-your-writes)"
            )
    regions = sorted({op.region for op in writes} | set(trees))
    for where, tree in trees.items():
        found = check_tree(history, tree, regions, f"region {where}")
        v.lost = max(v.lost, len(found))
        v.problems.extend(found)
    if appends is not None:
        found = check_appends(history, appends)
        v.lost = max(v.lost, len(found))
        v.problems.extend(found)
    return v
