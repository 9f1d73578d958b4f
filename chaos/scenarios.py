"""The chaos scenarios, and the runner that takes each through set-up, fault, heal and check.

Every scenario has the same shape (`run_scenario`):

1. a fresh volume in regions a and b (`Cluster`), the workload running on both
   mounts (`Workload`) for a third of the run;
2. the fault is injected; the workload goes on for another third;
3. the fault is healed (the heal time is noted) and the workload stops;
4. convergence: both regions `tidefs sync`ed, both states at the log's head
   with equal digests, every live block present and verifiable in each
   region's own store; the time from heal to that moment is reported;
5. the history is checked (`chaos.checker`) against each region's tree, and
   the two trees must be equal.

Each fault is a pair of functions (inject, heal) below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chaos.checker import Verdict, check, read_appends, read_tree
from chaos.harness import REGIONS, Cluster, Services, Unavailable, block_files, tidefs_cli
from chaos.history import Workload
from chaos.proxy import DROP, REFUSE

CONVERGE_TIMEOUT = 180.0
"""How long regions may take to converge after heal before the run fails."""


@dataclass
class Context:
    """What a fault's inject and heal functions work on."""

    cluster: Cluster
    services: Services
    workload: Workload
    notes: list[str] = field(default_factory=list)
    stash: dict[str, object] = field(default_factory=dict)


Fault = Callable[[Context], None]


@dataclass(frozen=True)
class Scenario:
    """A fault, how to heal it, and what the regions need for it."""

    name: str
    summary: str
    inject: Fault
    heal: Fault
    journal: str = "kafka"
    separate_replicator: bool = False
    cache_size: str | None = None


@dataclass
class Result:
    """The outcome of one scenario run."""

    scenario: str
    journal: str
    verdict: Verdict
    convergence_s: float | None
    digests: dict[str, str]
    seed: int
    notes: list[str]
    skipped: str = ""

    @property
    def ok(self) -> bool:
        return not self.skipped and self.verdict.ok and self.convergence_s is not None

    def as_dict(self) -> dict[str, object]:
        v = self.verdict
        return {
            "scenario": self.scenario,
            "journal": self.journal,
            "result": "skip" if self.skipped else ("ok" if self.ok else "FAIL"),
            "ops_acknowledged": v.acknowledged,
            "ops_unknown": v.unknown,
            "ops_failed": v.failed,
            "ops_lost": v.lost,
            "reads": v.reads,
            "reads_wrong": v.reads_wrong,
            "reads_failed": v.reads_failed,
            "reads_fresh_checked": v.reads_fresh_checked,
            "convergence_s": self.convergence_s,
            "digests": self.digests,
            "seed": self.seed,
            "problems": v.problems,
            "notes": self.notes,
            "skipped": self.skipped,
        }


# -- faults ---------------------------------------------------------------------------


def kill_mount(ctx: Context) -> None:
    """SIGKILL region b's mount mid-operation; hold b's workers until it is back."""
    ctx.cluster.kill_mount("b")
    ctx.workload.gates["b"].close()


def restart_mount(ctx: Context) -> None:
    ctx.cluster.restart_mount("b")
    ctx.workload.gates["b"].open()


def kill_fold(ctx: Context) -> None:
    """SIGKILL region b's mount while it folds a burst of region a's commands.

    The fold runs in the mount process: a burst of creates at region a keeps b
    folding, and b is killed once it has applied part of the burst.
    """
    from tidefs.replica.state import State, StateError

    m = ctx.cluster.mounts["b"]
    burst = ctx.cluster.path("a") / "burst"
    burst.mkdir(exist_ok=True)
    done = threading.Event()

    def make() -> None:
        for i in range(400):
            if done.is_set():
                return
            with contextlib.suppress(OSError):
                (burst / f"f{i}").touch()

    def applied() -> int:
        try:
            s = State.open(m.state_dir, read_only=True)
        except StateError:
            return -1
        try:
            return s.applied_offset()
        finally:
            s.close()

    start = applied()
    t = threading.Thread(target=make, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while applied() < start + 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    ctx.notes.append(f"killed at applied offset {applied()} (burst began after {start})")
    kill_mount(ctx)
    done.set()
    t.join(60)


def kill_replicator(ctx: Context) -> None:
    ctx.cluster.kill_replicator()


def restart_replicator(ctx: Context) -> None:
    ctx.cluster.start_replicator()


def kill_broker(ctx: Context) -> None:
    assert ctx.services.broker is not None
    ctx.services.broker.stop(kill=True)


def restart_broker(ctx: Context) -> None:
    assert ctx.services.broker is not None
    t = time.monotonic()
    ctx.services.broker.start()
    ctx.notes.append(f"broker back after {time.monotonic() - t:.1f}s")


def cut_region(ctx: Context) -> None:
    """Black-hole region b's traffic to the journal and to region a's store."""
    pids = ctx.cluster.pids("b")
    assert ctx.services.kafka_proxy is not None and ctx.services.s3_proxy is not None
    ctx.services.kafka_proxy.cut(DROP, pids)
    ctx.services.s3_proxy.cut(DROP, pids)


def heal_region(ctx: Context) -> None:
    assert ctx.services.kafka_proxy is not None and ctx.services.s3_proxy is not None
    ctx.notes.append(
        f"connections cut: journal {ctx.services.kafka_proxy.cut_connections}, "
        f"store a {ctx.services.s3_proxy.cut_connections} (counted since the run began)"
    )
    ctx.services.kafka_proxy.heal()
    ctx.services.s3_proxy.heal()


def stop_s3(ctx: Context) -> None:
    """Region a's S3 endpoint stops answering: every connection is refused."""
    assert ctx.services.s3_proxy is not None
    ctx.services.s3_proxy.cut(REFUSE)


def start_s3(ctx: Context) -> None:
    assert ctx.services.s3_proxy is not None
    ctx.services.s3_proxy.heal()


def corrupt_blocks(ctx: Context) -> None:
    """Flip bytes in the middle of a few block files of region b's directory store."""
    files = block_files(ctx.cluster.root / "store-b")
    rng = random.Random(ctx.workload.history.ops[0].op_id if ctx.workload.history.ops else 0)
    victims = files[:3]
    for path in victims:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.seek(size // 2)
            f.write(bytes(rng.getrandbits(8) for _ in range(16)))
    ctx.notes.append(f"corrupted {len(victims)} of {len(files)} blocks in region b's store")


def repair_blocks(ctx: Context) -> None:
    """`tidefs fsck --repair` region b: corrupt copies are replaced from region a."""
    c = ctx.cluster
    result = subprocess.run(
        [
            tidefs_cli(),
            "fsck",
            c.volume,
            "--journal",
            c.journal_url,
            "--region",
            "b",
            "--repair",
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    ctx.notes.append(f"fsck --repair exited {result.returncode}")


def fill_cache(ctx: Context) -> None:
    """Fill region b's cache disk (a small tmpfs) to the last byte."""
    filler = ctx.cluster.mounts["b"].cache_dir / "chaos-filler"
    written = 0
    chunk = b"\0" * (64 << 10)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(100_000):
            try:
                n = os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
            written += n
    finally:
        os.close(fd)
    ctx.notes.append(f"filled region b's cache disk with {written >> 10} KiB more")


def free_cache(ctx: Context) -> None:
    with contextlib.suppress(OSError):
        os.unlink(ctx.cluster.mounts["b"].cache_dir / "chaos-filler")


def _variants(base: Scenario, journals: tuple[str, ...]) -> list[Scenario]:
    out = []
    for j in journals:
        name = base.name if j == "kafka" else f"{base.name}-{j}"
        out.append(
            Scenario(
                name,
                base.summary,
                base.inject,
                base.heal,
                j,
                base.separate_replicator,
                base.cache_size,
            )
        )
    return out


_BASE = [
    (Scenario("kill-mount", "SIGKILL of region b's mount", kill_mount, restart_mount), True),
    (
        Scenario(
            "kill-fold", "SIGKILL of region b's mount while it folds", kill_fold, restart_mount
        ),
        True,
    ),
    (
        Scenario(
            "kill-replicator",
            "SIGKILL of region b's `tidefs replicate`",
            kill_replicator,
            restart_replicator,
            separate_replicator=True,
        ),
        True,
    ),
    (
        Scenario(
            "kafka-restart", "the Kafka broker killed and restarted", kill_broker, restart_broker
        ),
        False,
    ),
    (
        Scenario(
            "partition",
            "region b cut off from the journal and region a's store",
            cut_region,
            heal_region,
        ),
        False,
    ),
    (Scenario("s3-outage", "region a's S3 endpoint refuses connections", stop_s3, start_s3), True),
    (
        Scenario(
            "corrupt-block", "blocks corrupted in region b's store", corrupt_blocks, repair_blocks
        ),
        True,
    ),
    (
        Scenario(
            "cache-full",
            "region b's cache disk full",
            fill_cache,
            free_cache,
            cache_size="4m",
        ),
        True,
    ),
]

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for base, embedded in _BASE
    for s in _variants(base, ("kafka", "sqlite") if embedded else ("kafka",))
}
"""Every scenario by name; a fault that does not need Kafka also runs on the SQLite log."""


# -- the runner ---------------------------------------------------------------------------


def write_history(workload: Workload, path: Path) -> None:
    """Write every operation of `workload` as one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for op in workload.history.ops:
            f.write(json.dumps(dataclasses.asdict(op)) + "\n")


def run_scenario(
    scenario: Scenario,
    services: Services,
    workdir: Path,
    *,
    seconds: float = 9.0,
    seed: int | None = None,
    converge_timeout: float = CONVERGE_TIMEOUT,
    history_dir: Path | None = None,
) -> Result:
    """Run one scenario for about `seconds` of workload; return what the checker found.

    With `history_dir`, the history is written there as `<scenario>.jsonl`,
    one operation per line, for a reader who wants to follow a finding.
    """
    seed = seed if seed is not None else random.randrange(1 << 32)
    cluster = Cluster(
        workdir / scenario.name,
        services,
        scenario.journal,
        separate_replicator=scenario.separate_replicator,
        cache_size=scenario.cache_size,
    )
    phase = max(1.0, seconds / 3)
    verdict = Verdict()
    notes: list[str] = []
    digests: dict[str, str] = {}
    convergence: float | None = None
    workload: Workload | None = None
    t0 = time.monotonic()
    try:
        try:
            cluster.start()
        except Unavailable as exc:
            return Result(
                scenario.name, scenario.journal, verdict, None, {}, seed, notes, skipped=str(exc)
            )
        workload = Workload({r: cluster.path(r) for r in REGIONS}, seed=seed)
        ctx = Context(cluster, services, workload, notes)
        notes.append(f"set-up {time.monotonic() - t0:.1f}s")
        workload.prepare()
        workload.start()
        time.sleep(phase)
        scenario.inject(ctx)
        time.sleep(phase)
        healed = time.monotonic()  # convergence time counts from here, restarts included
        scenario.heal(ctx)
        notes.append(f"heal {time.monotonic() - healed:.1f}s")
        stuck = workload.finish(timeout=converge_timeout)
        notes.append(f"workload stopped after {time.monotonic() - healed:.1f}s")
        why = "not tried"
        last_kind = ""
        deadline = time.monotonic() + converge_timeout
        while time.monotonic() < deadline:
            cluster.sync(timeout=10)
            done, why, digests = cluster.converged()
            kind = why.split(":")[0].split(" ")[0]
            if kind != last_kind:  # a trail of what convergence waited for, for diagnosis
                notes.append(f"+{time.monotonic() - healed:.1f}s: {why[:200] or 'converged'}")
                last_kind = kind
            if done:
                convergence = time.monotonic() - healed
                break
            time.sleep(0.3)
        trees = {r: read_tree(cluster.path(r), list(REGIONS)) for r in REGIONS}
        appends = {r: read_appends(cluster.path(r)) for r in REGIONS}
        verdict = check(workload.history, workload.lineage, trees, appends)
        if history_dir is not None:
            write_history(workload, history_dir / f"{scenario.name}.jsonl")
        if stuck:
            verdict.problems.append(f"operations still stuck after heal: {', '.join(stuck)}")
        if convergence is None:
            verdict.problems.append(f"regions did not converge in {converge_timeout:g}s: {why}")
        if stuck or convergence is None:
            for region, m in cluster.mounts.items():
                notes.append(f"mount {region} log:\n{m.log_tail(20)}")
        if trees["a"] != trees["b"]:
            diff = sorted(
                p
                for p in set(trees["a"]) | set(trees["b"])
                if trees["a"].get(p) != trees["b"].get(p)
            )
            verdict.problems.append(f"the regions' trees differ at {diff[:5]}")
    finally:
        t1 = time.monotonic()
        if workload is not None:  # after an error: no operation may reach an unmounted path
            workload.finish(timeout=30)
        cluster.stop()
        notes.append(f"tear-down {time.monotonic() - t1:.1f}s")
    return Result(scenario.name, scenario.journal, verdict, convergence, digests, seed, notes)
