"""The POSIX conformance suite pjdfstest against a real mount, on each block store.

pjdfstest (its Rust edition, built by `scripts/fetch-pjdfstest`) makes about
400 checks of chmod, chown, link, mkdir, mkfifo, mknod, open, rename, rmdir,
symlink, truncate, unlink and utimensat: errno of every unhappy path,
permissions as another user, and which times each call updates. It runs as
root and switches to two unprivileged users, so the mount must serve other
users (allow_other) and let the kernel check permissions.

The aim is the same result as on tmpfs: no failure, and skips only for what
neither file system is asked to do here (remounting read-only, a LINK_MAX
that FUSE does not report). A second file system (the test's temporary
directory) lets the EXDEV cases of link and rename run too.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.mount import TidefsMount

pytestmark = pytest.mark.fuse

REPO = Path(__file__).resolve().parent.parent
PJDFSTEST = REPO / ".cache" / "pjdfstest" / "bin" / "pjdfstest"

# Why a check may be skipped, on tmpfs as on tidefs.
ACCEPTED_SKIPS = (
    "Remounts (allow_remount) are not allowed",
    "Cannot get value for LINK_MAX",
)

_RESULT = re.compile(r"^(\S+::\S+)\s+(ok|FAILED|skipped)\s*$")
_SUMMARY = re.compile(
    r"^Summary: (\d+) failed, (\d+) skipped, (\d+) passed, (\d+) expected failures, (\d+) total"
)


@dataclass
class Report:
    """What one pjdfstest run printed: each check's outcome and the reason given."""

    outcome: dict[str, str] = field(default_factory=dict)
    reason: dict[str, str] = field(default_factory=dict)
    summary: tuple[int, ...] | None = None

    def named(self, outcome: str) -> list[str]:
        return sorted(name for name, got in self.outcome.items() if got == outcome)


def parse(output: str) -> Report:
    """Read pjdfstest's report: `name  ok|FAILED|skipped`, then an indented reason."""
    report = Report()
    last = None
    for line in output.splitlines():
        if m := _RESULT.match(line):
            last = m.group(1)
            report.outcome[last] = m.group(2)
        elif m := _SUMMARY.match(line):
            report.summary = tuple(int(g) for g in m.groups())
        elif last is not None and line.startswith("\t") and last not in report.reason:
            report.reason[last] = line.strip()
    return report


def _users() -> list[tuple[str, str]]:
    """Two unprivileged users of this machine, each with its own primary group."""
    found: list[tuple[str, str]] = []
    for name in ("nobody", "daemon", "bin", "sys"):
        try:
            user = pwd.getpwnam(name)
            group = grp.getgrgid(user.pw_gid).gr_name
        except KeyError:
            continue
        if user.pw_uid != 0 and group not in {g for _, g in found}:
            found.append((name, group))
    return found[:2]


def _config(path: Path) -> Path:
    users = _users()
    if len(users) < 2:
        pytest.skip("pjdfstest needs two unprivileged users with distinct groups")
    entries = ", ".join(f'["{u}", "{g}"]' for u, g in users)
    path.write_text(
        "[features]\n"
        "posix_fallocate = {}\n"
        "rename_ctime = {}\n"
        "utime_now = {}\n"
        "utimensat = {}\n"
        "\n[settings]\n"
        "naptime = 0.05\n"
        "allow_remount = false\n"
        f"\n[dummy_auth]\nentries = [{entries}]\n"
    )
    return path


def test_pjdfstest_reports_no_failure(
    public_store_mount: TidefsMount, store_url: str, tmp_path: Path
) -> None:
    if not PJDFSTEST.exists():
        message = "pjdfstest is not built: run scripts/fetch-pjdfstest (needs cargo)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it; a missing suite must not pass quietly
        pytest.skip(message)
    if os.geteuid() != 0:
        pytest.skip("pjdfstest switches users; run as root for its whole coverage")
    secondary = tmp_path / "secondary"
    secondary.mkdir()
    run = subprocess.run(
        [
            str(PJDFSTEST),
            "--configuration-file", str(_config(tmp_path / "pjdfstest.toml")),
            "--path", str(public_store_mount.path),
            "--secondary-fs", str(secondary),
        ],
        cwd=public_store_mount.path,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    output = run.stdout + run.stderr
    report = parse(output)
    assert report.summary is not None, f"pjdfstest printed no summary:\n{output[-4000:]}"
    failed, skipped, passed, _, total = report.summary
    failures = {name: report.reason.get(name, "") for name in report.named("FAILED")}
    assert failed == 0 and not failures, (
        f"pjdfstest failures on the {store_url.split(':')[0]} store: {failures}"
    )
    assert run.returncode == 0, output[-4000:]
    assert len(report.outcome) == total and passed + skipped == total
    assert passed >= 350, f"only {passed} of {total} checks ran"
    unexpected = {
        name: report.reason.get(name, "")
        for name in report.named("skipped")
        if not report.reason.get(name, "").startswith(ACCEPTED_SKIPS)
    }
    assert not unexpected, f"checks skipped for a reason tmpfs does not have: {unexpected}"


def test_report_parser_reads_outcomes_reasons_and_summary() -> None:
    """The parser must see a failure, else the test above could pass a broken mount."""
    output = (
        "chmod::eloop_comp                    ok\n"
        "unlink::update_mtime_ctime_success_folder::fifo     FAILED\n"
        "\tTimestamps did not change as expected\n"
        "Backtrace:\n"
        "   0: pjdfstest::main\n"
        "link::erofs_named                  skipped\n"
        "\tRemounts (allow_remount) are not allowed in the configuration file\n"
        "\n"
        "Summary: 1 failed, 1 skipped, 1 passed, 0 expected failures, 3 total\n"
    )
    report = parse(output)
    assert report.summary == (1, 1, 1, 0, 3)
    assert report.named("FAILED") == ["unlink::update_mtime_ctime_success_folder::fifo"]
    assert report.reason["unlink::update_mtime_ctime_success_folder::fifo"] == (
        "Timestamps did not change as expected"
    )
    assert report.named("skipped") == ["link::erofs_named"]
    assert report.reason["link::erofs_named"].startswith(ACCEPTED_SKIPS)
    assert "chmod::eloop_comp" not in report.reason
