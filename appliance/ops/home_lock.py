"""One daemon per PAS_HOME (one hub per PAS_HUB_HOME): a lock file held for the daemon's life.

Owns: ``$PAS_HOME/pas.lock`` and ``$PAS_HUB_HOME/hub.lock`` (an advisory ``flock``, and the
holder's PID for the message). May not touch: the database or the spool.

Why: a second ``pas run`` on the same home (a second unit, a copy started by hand) used to
run start-up recovery before failing on the busy port, or to start fully on another one. Its
recovery released the live daemon's job leases as a dead worker's, and the two processes
then sent the same study at once. (``pas verify --repair`` beside the daemon was another
door to the same release until 2026-12-07: start-up recovery now keeps the leases while
another process holds this lock, :func:`appliance.ops.recovery._release_leases`.) The
kernel drops the lock when the holder dies, kill -9
included, so a crash never leaves the home locked.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


class HomeInUse(OSError):
    """Another live process holds this PAS_HOME's lock."""


def lock_file(home: Path) -> Path:
    """Where a home's lock lives (``pas doctor`` reads who holds it)."""
    return home / "pas.lock"


def hub_lock_file(home: Path) -> Path:
    """Where a hub home's lock lives (another name than the appliance's: a hub and an
    appliance never share a home, and one name for both would let either stop the other)."""
    return home / "hub.lock"


def hold_home_lock(home: Path) -> IO[str]:
    """Take the home's lock, or raise :class:`HomeInUse` naming the holder. Keep the
    returned file open for as long as the daemon runs."""
    home.mkdir(parents=True, exist_ok=True)
    return _hold(lock_file(home), lambda holder: (
        f"another pas run (pid {holder}) is using {home}: one daemon per PAS_HOME; stop it "
        "first (systemctl stop pas)"))


def hold_hub_lock(home: Path) -> IO[str]:
    """The hub's: ``pas hub run`` holds it for its life, ``pas hub restore`` while it puts a
    backup in place. Why: with no lock, a restore beside a serving hub replaced its database
    and keys under it, and nothing said so. The home is not created here (a mistyped
    ``PAS_HUB_HOME`` is the hub's refusal to make: no CA there)."""
    return _hold(hub_lock_file(home), lambda holder: (
        f"a pas hub run (pid {holder}) is using {home}: one hub per PAS_HUB_HOME; stop it "
        "first (systemctl stop pas-hub)"))


def _hold(path: Path, in_use: Callable[[str], str]) -> IO[str]:
    handle = open(path, "a+")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise HomeInUse(in_use(holder)) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
