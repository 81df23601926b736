"""Who is who on this machine, read from ``/proc``: the process listening on a TCP port, and
the process holding a PAS home's lock; and why a port could not be bound, in words
(:func:`bind_refused`, for ``pas run`` and ``pas hub run``; :func:`first_port_refused`
binds for a moment to ask).

Owns: reading ``/proc/net/tcp``, ``/proc/net/tcp6``, ``/proc/<pid>/fd``, ``/proc/locks`` and
``/proc/<pid>/comm``. May not touch: anything else. Every function only reads (or binds a
port for a moment, and closes it), and answers None when the kernel will not tell (another
user's process without the right to look).

Why: ``pas doctor`` used to call any program that answered a C-ECHO on the DICOM port "PAS".
DCMTK's storescp left running from a test, a PAS started on another home, or the old PACS
node on the same port all answered, and the check said ok while the modality's studies went
elsewhere. The daemon holds ``$PAS_HOME/pas.lock`` for its life (ops/home_lock.py): the port
is this PAS's only when the process listening on it is the one holding that lock.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def listening_pids(port: int) -> set[int] | None:
    """The processes holding a socket that listens on ``port`` (several after a fork); None
    when some process's descriptors could not be read, so that the answer may be partial
    and empty means nothing."""
    inodes = _listening_inodes(port)
    if not inodes:
        return set()
    wanted = {f"socket:[{inode}]" for inode in inodes}
    found: set[int] = set()
    unreadable = False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            descriptors = os.scandir(f"/proc/{entry.name}/fd")
        except PermissionError:
            unreadable = True
            continue
        except OSError:  # the process ended meanwhile
            continue
        with descriptors:
            for fd in descriptors:
                try:
                    if os.readlink(fd.path) in wanted:
                        found.add(int(entry.name))
                        break
                except OSError:
                    continue
    return found if found or not unreadable else None


def lock_holder(lock_file: Path) -> int | None:
    """The PID holding an exclusive ``flock`` on ``lock_file`` (the daemon's home lock),
    None when nobody does. Read from /proc/locks: taking the lock to test it, even for an
    instant, could make a daemon starting at that moment believe its home was in use."""
    try:
        info = lock_file.stat()
        locks = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in locks:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 31223 fe:00:2474243 0 EOF"; blocked waiters have "->"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE" \
                and fields[5] == device:
            return int(fields[4])
    return None


def process_name(pid: int) -> str:
    """The command name of ``pid`` (``storescp``, ``pas``...), "?" if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "?"
    except OSError:
        return "?"


def bind_refused(port_key: str, host_key: str, host: str, port: int, exc: OSError,
                 capability: str = "AmbientCapabilities=CAP_NET_BIND_SERVICE in its unit"
                 ) -> str:
    """One line saying why ``host:port`` could not be bound, naming the configuration key
    to change. ``pas run`` said "another program listens there?" whatever the cause: for an
    address this host does not have, and for a privileged port as a user without the right.
    ``capability``: how this service is given CAP_NET_BIND_SERVICE."""
    said = f"{port_key} {port} on {host}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        return f"{said} (another program listens there: ss -ltnp 'sport = :{port}')"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{said} (this host has no address {host}: set {host_key} to one it has, "
                "as ip -brief address lists them, or to 0.0.0.0 for all)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        if port < 1024:
            return (f"{said} (a port below 1024 is privileged: the service needs "
                    f"CAP_NET_BIND_SERVICE ({capability}), or set {port_key} to 1024 or above)")
        return (f"{said} (this user may not bind it: net.ipv4.ip_unprivileged_port_start "
                "raised, or a security policy)")
    return said


def first_port_refused(ports: list[tuple[str, str, str, int]], capability: str) -> str | None:
    """Binds each ``(port_key, host_key, host, port)`` for a moment, in order, and says
    (:func:`bind_refused`) why the first that cannot be bound cannot; None when all can.
    ``pas run`` asks before it creates a new home: refused for a port taken, it left behind
    an empty home (a database, a spool, a lock) where PAS_HOME had a typo."""
    import socket

    for port_key, host_key, host, port in ports:
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
        except OSError as exc:
            return bind_refused(port_key, host_key, host, port, exc, capability)
    return None
