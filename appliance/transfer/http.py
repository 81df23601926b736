"""Every HTTP client PAS opens, on the appliance and on the hub: one constructor, and the one
way a URL is written into a message.

Owns: :func:`http_client` / :func:`async_http_client` (httpx clients that read nothing from
the process's environment), :func:`shown_url` (a URL as a log line, a job's error, a doctor
row may carry it) and :class:`BearerAuth`. May not touch: anything but building these.

Why one constructor: httpx's default ``trust_env=True`` obeys ``HTTP_PROXY``/``HTTPS_PROXY``/
``ALL_PROXY`` (with no ``NO_PROXY`` default for loopback), ``SSL_CERT_FILE``/``SSL_CERT_DIR``
and ``~/.netrc``. A hospital's ``/etc/environment`` or a systemd drop-in then sent a
``http://127.0.0.1`` STOW-RS destination, which the configuration check takes for "this
machine, crosses no network", to a proxy on the network in clear, bodies and
``Authorization`` header included (invariant 5, docs/DESIGN "Nothing leaves the site in
clear"), and changed which CAs a ``verify=True`` client trusted. No documented deployment
needs a proxy: where PAS connects is what its configuration names, nothing else.
tests/test_http_clients.py refuses an ``httpx`` client built anywhere else.
"""

from __future__ import annotations

import re
from collections.abc import Generator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx


def http_client(**options: Any) -> httpx.Client:
    """``httpx.Client(**options)`` that ignores the environment (proxies, CA files, netrc)."""
    return httpx.Client(trust_env=False, **options)


def async_http_client(**options: Any) -> httpx.AsyncClient:
    """``httpx.AsyncClient(**options)`` that ignores the environment, as :func:`http_client`."""
    return httpx.AsyncClient(trust_env=False, **options)


def shown_url(url: str | httpx.URL) -> str:
    """``url`` as a message may carry it: scheme, host, port and path, without the userinfo
    (``user:password@``) and without the query string and fragment (a token or a patient
    identifier may travel there). The configuration refuses credentials in a URL; this is the
    second safeguard, since a job's error goes to the log, ``pas status``, the heartbeat and
    the hub's fleet pages."""
    text = str(url)
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError:  # not a URL one can take apart: say nothing of it rather than leak
        return "(a URL that cannot be shown)"
    if not parts.scheme or not host:
        return text.split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# Up to the last "@" before a space or quote: a password may hold "/", "?" or "#".
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s'\"<>]*@")


def without_userinfo(text: str) -> str:
    """``text`` with every URL's ``user:password@`` taken out: for words already written
    (a job's last_error from before the configuration refused credentials in URLs) that go
    on to be shown elsewhere (the heartbeat, then the hub's fleet pages)."""
    return _USERINFO.sub(r"\1", text)


class BearerAuth(httpx.Auth):
    """``Authorization: Bearer TOKEN`` on every request of a client, set as ``auth`` (so it
    is never among the headers a message or a proxy-like forward could copy)."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response,
                                                             None]:
        request.headers["Authorization"] = self._header
        yield request
