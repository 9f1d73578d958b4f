"""A TCP proxy that can cut chosen clients off: the network fault of the chaos suite.

A region is cut off from the journal and the other regions' stores by putting
this proxy between every client and those services, then telling it to stop
forwarding for that region's processes. Clients are told apart by process,
not by address (every process on this machine connects from 127.0.0.1): the
proxy looks up which process owns the client end of each accepted connection
in /proc, so one proxy can serve region a and cut region b at once, with no
network namespaces and no root.

Two ways to fail, as real networks do:
- "refuse": connections are reset at once (an endpoint that is down);
- "drop": connections are accepted and then never answered (a black hole,
  where clients only learn of the fault from their own time-outs).

On `cut`, connections already open from the cut processes are reset too; on
`heal`, connections held in a black hole are closed so that clients
reconnect, and everything is forwarded again.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
from collections.abc import Iterable

REFUSE = "refuse"
DROP = "drop"


def _socket_inode(local_port: int, remote_port: int) -> int | None:
    """Return the inode of the loopback socket 127.0.0.1:local_port -> :remote_port."""
    want_local = f"0100007F:{local_port:04X}"
    want_remote = f"0100007F:{remote_port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want_local and parts[2] == want_remote:
                    return int(parts[9])
    except OSError:
        return None
    return None


def _pid_owns(pid: int, inode: int) -> bool:
    """Whether process `pid` has socket `inode` open."""
    target = f"socket:[{inode}]"
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(f"{fd_dir}/{name}") == target:
                return True
    return False


def _reset(sock: socket.socket) -> None:
    """Close `sock` with a RST (SO_LINGER 0), as a vanished peer would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Conn:
    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        try:
            self.peer_port: int | None = client.getpeername()[1]
        except OSError:
            self.peer_port = None
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)


class TcpProxy:
    """Forward 127.0.0.1:`port` to `target_port`; `cut` some or all clients, `heal` them."""

    def __init__(self, target_port: int, port: int = 0, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._mode: str | None = None  # None: forwarding
        self._pids: frozenset[int] | None = None  # None with a mode: every client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="chaos-proxy", daemon=True)
        self.cut_connections = 0

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(5)
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for c in conns:
            c.close()

    # -- faults -------------------------------------------------------------------

    def cut(self, mode: str = DROP, pids: Iterable[int] | None = None) -> None:
        """Stop forwarding for the processes `pids` (every client when None)."""
        if mode not in (DROP, REFUSE):
            raise ValueError(f"unknown cut mode {mode!r}")
        with self._lock:
            self._mode = mode
            self._pids = None if pids is None else frozenset(pids)
            victims = [c for c in self._conns if self._is_cut(c)]
        for c in victims:
            self.cut_connections += 1
            c.close()

    def heal(self) -> None:
        """Forward everything again; connections held in a black hole are closed."""
        with self._lock:
            self._mode = None
            self._pids = None
            held = [c for c in self._conns if c.upstream is None]
        for c in held:
            c.close()

    def _is_cut(self, conn: _Conn) -> bool:
        """Whether `conn` comes from a cut client (call with the lock held)."""
        if self._mode is None:
            return False
        if self._pids is None:
            return True
        if conn.peer_port is None:
            return False
        inode = _socket_inode(conn.peer_port, self.port)
        return inode is not None and any(_pid_owns(pid, inode) for pid in self._pids)

    # -- forwarding ---------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.2)
                if not ready:
                    continue
                client, _addr = self._listener.accept()
            except OSError:
                return
            conn = _Conn(client)
            with self._lock:
                cut, mode = self._is_cut(conn), self._mode
                self._conns.add(conn)
            if cut and mode == REFUSE:
                self.cut_connections += 1
                self._forget(conn)
                conn.close()
                continue
            if cut:  # a black hole: hold it, answer nothing, until heal or close
                self.cut_connections += 1
                continue
            threading.Thread(target=self._pump, args=(conn,), daemon=True).start()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _pump(self, conn: _Conn) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._forget(conn)
            conn.close()
            return
        conn.upstream = upstream
        pairs = {conn.client: upstream, upstream: conn.client}
        try:
            while not conn.closed.is_set() and not self._stop.is_set():
                ready, _, _ = select.select(list(pairs), [], [], 0.2)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    pairs[src].sendall(data)
        except OSError:
            return
        finally:
            self._forget(conn)
            conn.close()
