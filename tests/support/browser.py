"""Debian's headless Chromium through Debian's chromedriver (Selenium, no downloads), and what
the web security tests need around it: a page of another site, the profile left on disk."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.serving import serve_in_thread

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def chromium(profile: Path | str, ignore_certificate_errors: bool = False,
             flags: tuple[str, ...] = ()) -> Any:
    """A Chromium whose profile (disk cache included) is ``profile``; the caller quits it.
    ``flags``: more command-line switches (``--host-resolver-rules=MAP name 127.0.0.1``: a
    name resolved to an address without any DNS)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*FLAGS, f"--user-data-dir={profile}", *flags):
        options.add_argument(flag)
    if ignore_certificate_errors:  # the hub's certificate comes from the fleet's private CA
        options.add_argument("--ignore-certificate-errors")
    os.environ.setdefault("SE_OFFLINE", "true")
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


class OtherSite:
    """Another site on the same network: one HTML page served at ``http://localhost:PORT/``
    (the PAS under test is reached as 127.0.0.1: another origin, another site). A ``data:``
    page will not do for frames: Chromium does not load a private address into a frame of
    it (Private Network Access), while a page of the hospital's network may."""

    def __init__(self, markup: str):
        body = markup.encode()

        class Page(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the handler's API)
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.url = f"http://localhost:{self.server.server_address[1]}/"
        self.thread: threading.Thread | None = None

    def __enter__(self) -> OtherSite:
        self.thread = serve_in_thread(self.server)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.thread is not None:
            self.thread.join(10)


def files_containing(folder: Path, needle: bytes) -> list[Path]:
    """Files under ``folder`` whose bytes contain ``needle``."""
    return [path for path in folder.rglob("*")
            if path.is_file() and needle in path.read_bytes()]
