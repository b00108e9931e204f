"""The processes serving an endpoint on this host: the owners of the socket listening on the url's port
(/proc/net/tcp and tcp6 give its inode, /proc/<pid>/fd who holds it) and their descendants (a model
server forks workers: gunicorn's, uvicorn's, a process pool; walked down from the owners, `ServerProcesses`
keeps them across answers and finds a restarted server again). Their CPU is the endpoint arm's own work,
not the other processes' load (`rollout.arms.host_load`).

Empty where they cannot be seen: another user's process (its fd table is not readable), another network
or PID namespace (a container), or no /proc. Linux only."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Collection, Iterable
from pathlib import Path
from urllib.parse import urlsplit

PROC = Path("/proc")
TCP_LISTEN = "0A"  # the `st` column of /proc/net/tcp for a listening socket


def url_port(url: str) -> int | None:
    """The TCP port of an http(s) url (its scheme's default where none is written)."""
    parts = urlsplit(url)
    try:
        return parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a port that is not a number
        return None


def proc_net_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of a /proc/net/tcp{,6} `local_address` ("0100007F:1F90" -> 127.0.0.1): the kernel
    prints each 32-bit word of it in host (little-endian) order."""
    raw = bytes.fromhex(hex_address.split(":", 1)[0])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listening_inodes(table: str, port: int, addresses: Collection[str]) -> set[int]:
    """Inodes of the sockets of a /proc/net/tcp{,6} text listening on `port` at one of `addresses`, at an
    unspecified address (0.0.0.0, ::: every address), or at the IPv4-mapped form of one; any address's
    where `addresses` has an unspecified one (a url naming 0.0.0.0 reaches a listener on loopback)."""
    wanted = {ipaddress.ip_address(a.split("%", 1)[0]) for a in addresses}
    anywhere = any(w.is_unspecified for w in wanted)
    out: set[int] = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != TCP_LISTEN or int(fields[1].rsplit(":", 1)[1], 16) != port:
            continue
        ip = proc_net_address(fields[1])
        mapped = getattr(ip, "ipv4_mapped", None)
        if anywhere or ip.is_unspecified or ip in wanted or (mapped is not None and mapped in wanted):
            out.add(int(fields[9]))
    return out


def socket_owners(inodes: Collection[int], proc: Path = PROC) -> set[int]:
    """Processes holding a file descriptor on one of the socket `inodes` (those whose fd table we may
    read: our own user's)."""
    links = {f"socket:[{i}]" for i in inodes}
    owners: set[int] = set()
    for pid in _pids(proc):
        try:
            fds = os.listdir(proc / str(pid) / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(proc / str(pid) / "fd" / fd) in links:
                    owners.add(pid)
                    break
            except OSError:
                continue
    return owners


def descendants(roots: Iterable[int], parents: dict[int, int]) -> set[int]:
    """`roots` and every process whose parent chain leads to one of them (`parents`: pid -> ppid)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += children.get(pid, [])
    return out


def start_time(pid: int, proc: Path = PROC) -> int | None:
    """A process's start time (clock ticks since boot, /proc/<pid>/stat field 22): with its pid, the
    process itself (a pid is reused by a later process, never with the same start time); None: gone."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def children(pid: int, proc: Path = PROC) -> set[int] | None:
    """A process's children, from /proc/<pid>/task/*/children (one read per thread); None where the
    kernel has no such file (built without CONFIG_PROC_CHILDREN) or the process is gone."""
    try:
        tids = os.listdir(proc / str(pid) / "task")
    except OSError:
        return None
    out: set[int] = set()
    for tid in tids:
        try:
            out |= {int(c) for c in (proc / str(pid) / "task" / tid / "children").read_text().split()}
        except FileNotFoundError:
            if not (proc / str(pid) / "task" / tid).exists():
                continue  # the thread ended meanwhile
            return None  # the kernel has no children files
        except (OSError, ValueError):
            continue
    return out


def process_tree(roots: Iterable[int], proc: Path = PROC) -> set[int] | None:
    """`roots` and their descendants, walked down from them (one read per thread of the tree, not one per
    process of the host); None where the kernel cannot list a process's children (`children`)."""
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        kids = children(pid, proc)
        if kids is None:
            if start_time(pid, proc) is None:
                continue  # ended meanwhile
            return None
        out.add(pid)
        todo += kids
    return out


def process_parents(proc: Path = PROC) -> dict[int, int]:
    """pid -> parent pid of every process in /proc/<pid>/stat."""
    out = {}
    for pid in _pids(proc):
        try:
            stat = (proc / str(pid) / "stat").read_text()
            out[pid] = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
    return out


def listening_processes(url: str) -> set[int]:
    """The processes holding the socket that listens for `url` on this host (empty: none seen)."""
    port = url_port(url)
    host = urlsplit(url).hostname
    if port is None or not host:
        return set()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return set()
    inodes: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            inodes |= listening_inodes((PROC / "net" / name).read_text(), port, addresses)
        except (OSError, ValueError):
            continue
    return socket_owners(inodes) if inodes else set()


class ServerProcesses:
    """The processes serving `url` on this host now (`tree()`), cheap enough to read at both ends of every
    answer: the listening socket's owners (`listening_processes`, a scan of every process's fds) are
    looked up at the first call, and again only where one of them ended or its pid now names another
    process (its start time changed: a server restarted); their descendants are walked from them
    (`process_tree`), or, on a kernel without children files, read from one scan of every process's
    parent, made again only where a process of the tree ended (a worker forked later is then not seen
    until one does). Empty: none seen (another user's, another namespace's, or the server gone)."""

    def __init__(self, url: str, proc: Path = PROC) -> None:
        self.url, self.proc = url, proc
        self._roots: dict[int, int] = {}  # pid -> start time of the listening socket's owners
        self._tree: dict[int, int] | None = None  # without children files: the tree from the last scan
        self._looked = self._seen = False
        self._lock = threading.Lock()

    def roots(self) -> set[int]:
        """The listening socket's owners, looked up again where one of those seen has ended (a server
        seen once and gone is looked for at every call until it is back; one never seen is not)."""
        with self._lock:
            if not self._looked or self._stale():
                self._roots = _identities(listening_processes(self.url), self.proc)
                self._looked, self._tree = True, None
                self._seen = self._seen or bool(self._roots)
            return set(self._roots)

    def tree(self) -> set[int]:
        roots = self.roots()
        if not roots:
            return set()
        walked = process_tree(roots, self.proc)
        if walked is not None:
            return walked
        with self._lock:
            if self._tree is None or any(start_time(p, self.proc) != t for p, t in self._tree.items()):
                self._tree = _identities(descendants(roots, process_parents(self.proc)), self.proc)
            return set(self._tree)

    def _stale(self) -> bool:
        """A server seen once is not all there now: one of its owners ended, or none is left."""
        return self._seen and (
            not self._roots or any(start_time(p, self.proc) != t for p, t in self._roots.items())
        )


def _identities(pids: Iterable[int], proc: Path) -> dict[int, int]:
    """pid -> start time of those of `pids` still running."""
    return {pid: t for pid in pids if (t := start_time(pid, proc)) is not None}


def _pids(proc: Path) -> list[int]:
    try:
        return [int(p) for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return []
