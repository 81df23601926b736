"""Which names the appliance's HTTP port answers to: the Host check against DNS rebinding.

Owns: the names PAS is known by (:class:`KnownHosts`) and :class:`HostGuard`, the middleware
in front of every route that refuses a request whose ``Host`` header names anything else
(421, nothing served, logged and in the audit trail). May not touch: the store, the routes.

Why: a page a radiologist's browser loads from the internet (``http://evil.example:8080``)
can make its own name resolve, a moment later, to PAS's address on the hospital's network
(DNS rebinding). The browser then sends that page's requests to PAS and, the origin being
the same to it, lets the page read the answers: the status page's patient IDs, DICOMweb's
studies, the Retry form's token. Nothing in those requests is foreign except the
``Host`` header, which still says ``evil.example``. So PAS answers only the names it is
known by:

- any IP literal (v4, v6): a browser sends one only when the page's URL has that address,
  no name is resolved, nothing can be rebound;
- ``localhost``, the machine's host name and FQDN (read at start-up), ``http.host`` when it
  is a name, and with ``serving.auth = "client_cert"`` the DNS names of ``serving.tls_cert``;
- ``http.allowed_hosts``: the other names IT gives the appliance (a DNS alias, a CNAME).

The check applies whatever ``serving.auth`` is. With ``none`` it is the only defence. With
``bearer`` over plain HTTP a browser that adds the token by itself (a proxy or extension
adding the header, the way docs/operations.md tells ops to reach the page) sends it to the
rebound name too. With ``client_cert`` the browser's own check of the certificate's name
already fails the connection, and the certificate's names are allowed here, so the check
costs nothing there. ``/healthz`` stays open, as under the bearer guard: it says "ok" and
nothing else, and probes may use any name.

A request without a Host header (HTTP/1.0, a script) passes: every browser sends one.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.ops.refusals import RefusalAudit
from appliance.web.auth import OPEN_PATHS

if TYPE_CHECKING:
    from appliance.config import Settings

log = logging.getLogger("pas.web")

# What a reg-name may hold once lower-cased (RFC 3986 unreserved characters; a browser sends
# an IDN in its xn-- form). Anything else is not a Host a browser writes.
_NAME = re.compile(r"[a-z0-9._~-]+")
# Refused names logged once per this many seconds each (the audit row is coalesced alike): a
# page polling for its rebinding would otherwise write a journal line per request.
LOG_EVERY_S = 60.0
_LOGGED_AT_MOST = 256


def host_of(header: str) -> str | None:
    """The host of a Host header value, lower case, without port nor final dot (an IPv6
    address without brackets, in its short form); ``None`` when the value is not a host
    (``a b``, ``::1`` unbracketed, ``host:port:x``)."""
    value = header.strip()
    if value.startswith("["):
        inner, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        try:
            return ipaddress.IPv6Address(inner).compressed
        except ValueError:
            return None
    name, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    name = name.lower()
    name = name[:-1] if name.endswith(".") else name
    return name if _NAME.fullmatch(name) else None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def certificate_names(path: Path) -> list[str]:
    """The exact DNS names of a PEM certificate's subjectAltName (wildcards left out: the
    names here are answered exactly). Empty when the file cannot be read or parsed: the TLS
    set-up names that problem itself."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [name.lower().rstrip(".") for name in names if "*" not in name]


class KnownHosts:
    """The names a request's Host may carry; IP literals always pass."""

    def __init__(self, names: Iterable[str]):
        self.names = frozenset(n.lower().rstrip(".") for n in names if n) | {"localhost"}

    @classmethod
    def of(cls, settings: Settings) -> KnownHosts:
        """The machine's names (read once: a host renamed while PAS runs is known after a
        restart), ``http.host`` if it is a name, the certificate's with ``client_cert``,
        and ``http.allowed_hosts``."""
        names = [socket.gethostname(), socket.getfqdn(), *settings.http.allowed_hosts]
        if settings.http.host and not is_ip_literal(settings.http.host.strip("[]")):
            names.append(settings.http.host)
        serving = settings.serving
        if serving.tls_cert is not None and serving.tls_key is not None:  # the port's TLS
            names.extend(certificate_names(serving.tls_cert))
        return cls(names)

    def allows(self, host: str) -> bool:
        return host in self.names or is_ip_literal(host)


class HostGuard:
    """ASGI middleware: a request whose Host names neither an IP address nor one of the
    known names gets 421 (400 for a Host that is not one, or two Host headers), and the
    route is not run."""

    def __init__(self, app: ASGIApp, known: KnownHosts, refusals: RefusalAudit | None = None):
        self.app = app
        self.known = known
        self.refusals = refusals
        self._logged: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Only "http": the app has no websocket route (Starlette closes those unrouted).
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        values = [v.decode("latin-1") for k, v in scope["headers"] if k == b"host"]
        if not values:
            await self.app(scope, receive, send)
            return
        host = host_of(values[0]) if len(values) == 1 else None
        if host is not None and self.known.allows(host):
            await self.app(scope, receive, send)
            return
        shown = values[0][:100] if len(values) == 1 else ", ".join(v[:100] for v in values)
        if host is None:
            status = 400
            detail = (f"malformed Host header {shown!r}" if len(values) == 1 else
                      f"{len(values)} Host headers ({shown}): a request has one")
        else:
            status = 421
            detail = (f"this appliance does not answer to the name {host!r} (Host header): "
                      "it answers to its IP addresses, localhost, its host name and the names "
                      "in http.allowed_hosts (appliance.toml). If PAS is reached by this "
                      "name, add it there and restart PAS.")
        await JSONResponse({"error": status, "detail": detail}, status_code=status)(
            scope, receive, send)
        client = scope.get("client")
        source = client[0] if client else None
        self._log(shown, source, status)
        if self.refusals is not None:
            await run_in_threadpool(  # the database write off the event loop
                self.refusals.refused, channel="http", kind="host-header", source=source,
                actor="anonymous", target=str(scope["path"])[:200],
                reason=f"HTTP request refused ({status}): Host {shown!r} is not a name of "
                       "this appliance (DNS rebinding?)", value=repr(shown))

    def _log(self, shown: str, source: str | None, status: int) -> None:
        now = time.monotonic()
        if now - self._logged.get(shown, -LOG_EVERY_S) < LOG_EVERY_S:
            return
        if len(self._logged) >= _LOGGED_AT_MOST:  # bounded: a scan of many names
            self._logged.clear()
        self._logged[shown] = now
        log.warning("refused HTTP requests (%d) from %s naming Host %r: not a name of this "
                    "appliance (known: IP addresses, %s; http.allowed_hosts adds one); a "
                    "page using DNS rebinding, or a name to add (logged once a minute per "
                    "name)", status, source or "?", shown, ", ".join(sorted(self.known.names)),
                    extra={"HOST_HEADER": shown})
