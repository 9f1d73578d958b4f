"""Local files that only their owner may read: state, cache, store, log and records.

A block store directory holds every file's bytes, a state directory or an
SQLite log every name: on a machine shared with other users they must be
the owner's alone, whatever the modes of the files seen through the mount.
So tidefs creates what it keeps locally owner-only (directories 0700, files
0600) by passing the mode to mkdir and open, never by changing the process's
umask, which would also change the files other code creates. `exposure`
tells, at mount time, when something made before (or by hand) is open to
other users.
"""

from __future__ import annotations

import os
import stat

DIR_MODE = 0o700
FILE_MODE = 0o600


def makedirs(path: str | os.PathLike[str]) -> None:
    """Create directory `path` and its missing parents, each owner-only (0700).

    Directories that exist already are left as they are. Raises OSError.
    """
    missing: list[str] = []
    p = os.path.abspath(os.fspath(path))
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
            continue  # made meanwhile by another process: not ours to change
        # mkdir's mode passes through the umask: make it exactly 0700.
        os.chmod(d, DIR_MODE)


def missing_dirs(path: str | os.PathLike[str]) -> list[str]:
    """The directories that creating directory `path` would make, deepest first (absolute).

    What a failed start or format may remove again: never one that existed.
    """
    p = os.path.abspath(os.fspath(path))
    missing: list[str] = []
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return missing


def create_file(path: str | os.PathLike[str], flags: int = os.O_WRONLY) -> int:
    """Open `path`, creating it owner-only (0600) if missing; return the descriptor."""
    return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)


def exposure(path: str | os.PathLike[str]) -> str | None:
    """Why other users may reach `path` (one phrase), or None when it is private or missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not {os.geteuid()}"
    if st.st_mode & 0o077:
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
        return f"is a {kind} other users may reach (mode {stat.S_IMODE(st.st_mode):04o})"
    return None
