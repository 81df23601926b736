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
needs a proxy from the environment: where PAS connects is what its configuration names,
nothing else. The one proxy PAS uses is the one its configuration names for the hub
(``hub.proxy``: :func:`hub_proxy`, given to each client towards the hub).
tests/test_http_clients.py refuses an ``httpx`` client built anywhere else.
"""

from __future__ import annotations

import re
from collections.abc import Generator
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx

# What a client's transport takes rather than the client, when the client is given a
# transport of its own (a proxied one): httpx ignores them on the client then.
_TRANSPORT_OPTIONS = ("verify", "cert", "http1", "http2", "limits")


def http_client(*, proxy: httpx.Proxy | None = None, **options: Any) -> httpx.Client:
    """``httpx.Client(**options)`` that ignores the environment (proxies, CA files, netrc).

    ``proxy``: every request a CONNECT tunnel through it (:func:`hub_proxy`). The client
    then gets one transport, the proxied one, as its own (not a mount beside a direct one),
    so that what tunes the client's transport (the uplink's pacing backend) tunes the one
    that carries its requests, and no request can go around the proxy."""
    if proxy is None:
        return httpx.Client(trust_env=False, **options)
    carried = {key: options.pop(key) for key in _TRANSPORT_OPTIONS if key in options}
    return httpx.Client(trust_env=False, transport=httpx.HTTPTransport(
        proxy=proxy, trust_env=False, **carried), **options)


def async_http_client(*, proxy: httpx.Proxy | None = None,
                      **options: Any) -> httpx.AsyncClient:
    """``httpx.AsyncClient(**options)`` that ignores the environment, as :func:`http_client`."""
    if proxy is None:
        return httpx.AsyncClient(trust_env=False, **options)
    carried = {key: options.pop(key) for key in _TRANSPORT_OPTIONS if key in options}
    return httpx.AsyncClient(trust_env=False, transport=httpx.AsyncHTTPTransport(
        proxy=proxy, trust_env=False, **carried), **options)


class ProxySettings(Protocol):
    """What :func:`hub_proxy` reads of the configuration's ``[hub]`` section."""

    proxy: str | None
    proxy_username: str | None
    proxy_password: str | None


def hub_proxy(hub: ProxySettings) -> httpx.Proxy | None:
    """The hospital's outgoing proxy towards the hub (``hub.proxy``), its credentials as
    HTTP Basic on each CONNECT, or None: straight to the hub."""
    if not hub.proxy:
        return None
    auth = ((hub.proxy_username, hub.proxy_password or "")
            if hub.proxy_username is not None else None)
    return httpx.Proxy(hub.proxy, auth=auth)


def proxy_words(proxy: httpx.Proxy | None) -> str:
    """`` through the proxy http://host:port`` for a message about the hub, or nothing."""
    return f" through the proxy {shown_url(proxy.url)}" if proxy is not None else ""


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
