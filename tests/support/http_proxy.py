"""A hospital's outgoing HTTP proxy as a real peer: Debian's ``tinyproxy`` (``make test``
installs it), CONNECT tunnels only to the ports it is told, HTTP Basic when given
credentials, each tunnel it is asked for written to its log.

Binds to the address it is given (loopback, or this side of a test's network namespace);
its files are in the test's temporary folder.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

from tests.support.peers import free_port


class TinyProxy:
    """``tinyproxy -d`` on ``listen``:``port``, taking clients from ``allow`` only and
    opening tunnels to ``connect_ports`` only (a proxy refuses others with 403)."""

    def __init__(self, folder: Path, listen: str, allow: str, connect_ports: list[int],
                 credentials: tuple[str, str] | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.listen, self.port = folder, listen, free_port()
        self.log_path = folder / "tinyproxy.log"
        lines = [f"Port {self.port}", f"Listen {listen}", "Timeout 120",
                 f'LogFile "{self.log_path}"', "LogLevel Connect",
                 f'PidFile "{folder / "tinyproxy.pid"}"', "MaxClients 64", f"Allow {allow}",
                 *(f"ConnectPort {port}" for port in connect_ports)]
        if credentials is not None:
            lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
        self.config = folder / "tinyproxy.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen}:{self.port}"

    def start(self, timeout: float = 10.0) -> TinyProxy:
        self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(self.config)],
                                     stdout=subprocess.DEVNULL,
                                     stderr=(self.folder / "stderr.txt").open("wb"))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.listen, self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"tinyproxy did not start: {self.log()[-2000:]}") \
                        from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tunnels(self) -> list[str]:
        """Every ``host:port`` a client asked a tunnel to, in order (refused ones included)."""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP", self.log())
