"""systemd's notification protocol (sd_notify): READY=1, WATCHDOG=1, STATUS=...

Owns: talking to ``$NOTIFY_SOCKET``. Uses systemd-python's ``systemd.daemon.notify`` when it
is importable, and otherwise a plain unix datagram, which is all the protocol is, so the
appliance behaves the same whether or not the optional dependency is installed. Outside
systemd (no ``$NOTIFY_SOCKET``) every call is a no-op. May not touch: the store or anything
the daemon does; the daemon decides *when* to notify (READY only once the SCP listens and the
database is open, WATCHDOG from its main loop).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

from appliance.words import counted

log = logging.getLogger("pas.ops.notify")


def _systemd_sender() -> Callable[[str], bool] | None:
    try:
        from systemd import daemon as sd_daemon  # type: ignore[import-not-found]
    except ImportError:
        return None

    def send(message: str) -> bool:
        return bool(sd_daemon.notify(message))

    return send


class Notifier:
    """Sends sd_notify messages; knows the watchdog interval systemd asked for."""

    def __init__(self, environ: Mapping[str, str] | None = None,
                 use_systemd_python: bool = True):
        env = os.environ if environ is None else environ
        self.socket_path = env.get("NOTIFY_SOCKET") or None
        self.watchdog_interval_s = self._watchdog_interval(env)
        self._send_with_library = _systemd_sender() if use_systemd_python else None
        self._sock: socket.socket | None = None

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        """Half of ``WATCHDOG_USEC`` (systemd's advice), or None when no watchdog is armed
        for this process."""
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
            return None
        try:
            return max(int(usec) / 2_000_000, 0.05)
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
            return None

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def notify(self, message: str) -> bool:
        """Send one message (``KEY=value`` lines). False when there is nowhere to send it or
        sending failed; notification is best effort and never stops the daemon."""
        if not self.enabled:
            return False
        if self._send_with_library is not None:
            try:
                return self._send_with_library(message)
            except Exception:  # fall back to the plain socket below
                log.debug("systemd.daemon.notify failed; using the socket", exc_info=True)
        return self._send_datagram(message)

    def _send_datagram(self, message: str) -> bool:
        assert self.socket_path is not None
        address = self.socket_path
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), address)
            return True
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.socket_path, exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self, status: str = "") -> bool:
        return self.notify("WATCHDOG=1" + (f"\nSTATUS={status}" if status else ""))

    def extend_start(self, status: str, seconds: float = 60.0) -> bool:
        """Start-up is still going (a long recovery): systemd's start timeout is moved to
        ``seconds`` from now (systemd >= 236; older ones ignore it), and says why."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}\nSTATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def backlog_status(backlog: list[dict[str, object]]) -> str:
    """One STATUS= line for ``systemctl status``: what is still to be delivered."""
    if not backlog:
        return "idle: nothing queued"
    parts = [f"{row['destination']}: {counted(row['studies'], 'study', 'studies')}, "
             f"oldest {row['oldest_age_s']:.0f}s" for row in backlog]  # type: ignore[str-format]
    return "backlog " + "; ".join(parts)
