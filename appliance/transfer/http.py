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
import threading
import time
from collections.abc import Generator
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpcore
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
    transport = _ProxiedTransport(proxy, _connect_bound(options.get("timeout")), carried)
    return httpx.Client(trust_env=False, transport=transport, **options)


def async_http_client(**options: Any) -> httpx.AsyncClient:
    """``httpx.AsyncClient(**options)`` that ignores the environment, as :func:`http_client`
    (the hub's own clients: never through a proxy)."""
    return httpx.AsyncClient(trust_env=False, **options)


def _connect_bound(timeout: Any) -> float | None:
    """The connect timeout of a client's ``timeout`` option (an ``httpx.Timeout`` or seconds)."""
    if isinstance(timeout, httpx.Timeout):
        return timeout.connect
    return float(timeout) if isinstance(timeout, int | float) else None


# How long every call through the proxy (the credentials refused: 401, 407), or every call
# to the same host and port (the tunnel refused: 403), is refused here instead of asking
# the proxy again (review s42 F1): a proxy checking
# its Basic credentials against the hospital's directory locked the service account within
# minutes, each worker, the keep-warm thread and the heartbeat asking again every few
# seconds. Asked again after this, a proxy put right meanwhile is used without a restart.
PROXY_REFUSED_WAIT_S = 300.0
_REFUSING = ("401", "403", "407")
_DEFAULT_PORTS = {"https": 443, "http": 80}
_refused_lock = threading.Lock()
# (proxy, credentials, tunnel) -> (until, its answer). ``tunnel`` is "" for a refusal of the
# credentials (401, 407: every tunnel through that proxy with them is refused) and the
# ``host:port`` asked for a refusal of the tunnel (403): a proxy forbidding a STOW-RS
# archive's port made every call to the hub fail here for 5 minutes, the proxy not asked
# (review s43: one key per proxy and credentials, when the hub was its only user).
_refused: dict[tuple[str, bytes, str], tuple[float, str]] = {}


class _ProxiedTransport(httpx.HTTPTransport):
    """httpx's transport through ``proxy``, with two things httpx does not do:

    - the proxy's answer to CONNECT awaited at most the connect timeout (``bound_s``), not
      the read timeout: through the proxy a hub that drops every packet held each call for
      the whole read timeout (60 s) instead of the connect bound (10 s) a direct call has;
    - a refusal of the proxy's remembered for :data:`PROXY_REFUSED_WAIT_S`, for every
      client of this process through the same proxy and credentials (401, 407), or for
      those asking the same host and port (403): the calls meanwhile fail here with the
      same answer, the proxy not asked. The memory holds one entry per refused tunnel; the
      tunnels come from the configuration (the hub, STOW-RS urls, the region's)."""

    def __init__(self, proxy: httpx.Proxy, bound_s: float | None, options: dict[str, Any]):
        super().__init__(proxy=proxy, trust_env=False, **options)
        self._key = (str(proxy.url), b":".join(proxy.raw_auth or ()))
        self._pool._network_backend = TunnelBound(bound_s)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        tunnel = f"{url.host}:{url.port or _DEFAULT_PORTS.get(url.scheme, 0)}"
        with _refused_lock:
            until, answer = max(_refused.get((*self._key, ""), (0.0, "")),
                                _refused.get((*self._key, tunnel), (0.0, "")))
        left = until - time.monotonic()
        if left > 0:
            raise httpx.ProxyError(f"{answer} (the proxy's answer {PROXY_REFUSED_WAIT_S - left:.0f}"
                                   f" s ago: not asked again for {left:.0f} s)", request=request)
        try:
            return super().handle_request(request)
        except httpx.ProxyError as exc:
            if str(exc).startswith(_REFUSING):
                which = tunnel if str(exc).startswith("403") else ""
                with _refused_lock:
                    _refused[(*self._key, which)] = (time.monotonic() + PROXY_REFUSED_WAIT_S,
                                                     str(exc))
            raise


class TunnelBound(httpcore.SyncBackend):
    """httpcore's network backend whose plain connections bound each read to ``bound_s``
    until TLS starts on them: the wait for the proxy's answer to CONNECT (the tunnel's TLS
    handshake has the connect timeout already; what is read after it, the call's own)."""

    def __init__(self, bound_s: float | None):
        self.bound_s = bound_s

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        stream = super().connect_tcp(*args, **kwargs)
        bound = self.bound_s
        if bound is None:
            return stream
        plain_read, plain_start_tls = stream.read, stream.start_tls

        def read(max_bytes: int, timeout: float | None = None) -> bytes:
            return plain_read(max_bytes, bound if timeout is None else min(timeout, bound))

        def start_tls(*tls_args: Any, **tls_kwargs: Any) -> httpcore.NetworkStream:
            stream.read = plain_read  # type: ignore[method-assign]
            return plain_start_tls(*tls_args, **tls_kwargs)

        stream.read = read  # type: ignore[method-assign]
        stream.start_tls = start_tls  # type: ignore[method-assign]
        return stream


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
