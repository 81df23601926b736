"""TLS for the hub: the server SSLContext and the peer certificate in the ASGI scope.

Owns: how uvicorn is told to speak TLS 1.3 with optional client certificates, and how a
request learns which certificate its connection presented. May not touch: the database (the
revocation check itself is in :mod:`appliance.hub.app`), routes.

uvicorn does not put the client certificate into the ASGI scope. :class:`PeerCertProtocol` is a
small subclass of uvicorn's h11 protocol: when a connection is made (asyncio calls this only
after the TLS handshake completed) it reads the peer certificate (DER) from the SSL object and
wraps the app so that every request on that connection carries
``scope["extensions"]["tls"] = {"client_cert_der": ..., "tls_version": ...}`` (the shape of the
ASGI TLS extension), and ``scope["extensions"]["pas.transport"]``, the connection's asyncio
transport (download lanes set its socket's pacing and its buffer). The app then checks
revocation per request, against the database, so that ``pas hub revoke SITE`` takes effect at
once, even on a keep-alive connection opened before.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import weakref
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from appliance.hub.config import HubHttpSection
from appliance.hub.fleet_gate import PacedWarnings
from appliance.hub.pki import HubPKI

log = logging.getLogger("pas.hub.tls")


class PeerCertProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus the TLS extension (peer certificate) in every scope."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        tls: dict[str, Any] = {"client_cert_der": None, "tls_version": None}
        if ssl_object is not None:
            tls["client_cert_der"] = ssl_object.getpeercert(binary_form=True)
            tls["tls_version"] = ssl_object.version()
        inner = self.app

        async def with_tls(scope: Any, receive: Any, send: Any) -> None:
            scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls,
                                   "pas.transport": transport}
            await inner(scope, receive, send)

        self.app = with_tls


def server_config(app: Any, pki: HubPKI, host: str, port: int,
                  log_level: str = "warning", bounds: HubHttpSection | None = None,
                  ) -> uvicorn.Config:
    """uvicorn configuration: TLS 1.3 minimum, the fleet CA as the only client trust anchor,
    client certificates optional at the TLS layer (``/enroll`` has none yet) and required by
    the app on ``/api/v1``. A certificate from another CA fails the handshake. ``bounds``:
    the port's connection, request and answer bounds (``http.*``; the defaults when None)."""
    from appliance.web.bounded import bounded_protocol

    bounds = bounds or HubHttpSection()
    protocol = bounded_protocol(bounds.max_connections, bounds.request_timeout_s,
                                bounds.send_timeout_s, base=PeerCertProtocol)
    config = uvicorn.Config(
        app, host=host, port=port, http=protocol, log_level=log_level,
        access_log=False, lifespan="off", ssl_certfile=str(pki.server_cert_path),
        # uvicorn's default believed X-Forwarded-For from loopback: behind a forwarder on the
        # hub's host (a socket for port 443, as pas-hub.service suggests) each guess at a
        # dashboard password named its own address, never limited, and the log said it.
        proxy_headers=False,
        ssl_keyfile=str(pki.server_key_path), ssl_ca_certs=str(pki.ca_cert_path),
        ssl_cert_reqs=ssl.CERT_OPTIONAL, timeout_keep_alive=30,
        # A stop (systemctl stop, a restart) waits at most this long for requests in flight:
        # appliances resume any transfer, and idle keep-alive connections must not hold it.
        timeout_graceful_shutdown=5,
    )
    config.load()
    assert config.ssl is not None
    config.ssl.minimum_version = ssl.TLSVersion.TLSv1_3
    config.ssl._msg_callback = _log_refusals  # type: ignore[attr-defined]
    return config


def _send_the_alert_of_a_refused_handshake() -> None:
    """Make asyncio send the TLS alert of a handshake it refuses before it drops the socket.

    asyncio's SSL protocol (CPython 3.11-3.13, ``asyncio.sslproto``) closes the transport at
    once when the handshake fails, and the alert OpenSSL wrote (``unknown_ca``,
    ``decrypt_error``, ``certificate_expired`` ...) stays in its memory buffer, never sent.
    Under TLS 1.3 the client has finished its side of the handshake by then, so all an
    appliance whose certificate the hub refuses saw was "Server disconnected without sending
    a response": a link down, waited for for ever, instead of a refused certificate that
    needs a new enrolment. The alert is now written to the socket first (one small record,
    sent at once by the kernel: the transport's buffer is empty at the handshake)."""
    from asyncio import sslproto

    protocol = getattr(sslproto, "SSLProtocol", None)
    original = getattr(protocol, "_on_handshake_complete", None)
    if original is None or getattr(original, "_pas_sends_alert", False):
        return  # another asyncio: nothing to patch (the client then sees a link down)

    def on_handshake_complete(self: Any, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            with contextlib.suppress(Exception):  # the refusal itself must go on
                self._process_outgoing()
        original(self, handshake_exc)

    on_handshake_complete._pas_sends_alert = True  # type: ignore[attr-defined]
    protocol._on_handshake_complete = on_handshake_complete  # type: ignore[union-attr]


_send_the_alert_of_a_refused_handshake()


# TLS alert descriptions (RFC 8446 6.2) the hub sends when it refuses a handshake.
ALERTS = {40: "handshake_failure", 42: "bad_certificate", 43: "unsupported_certificate",
          44: "certificate_revoked", 45: "certificate_expired", 46: "certificate_unknown",
          48: "unknown_ca", 51: "decrypt_error", 70: "protocol_version",
          116: "certificate_required"}
_presented: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_refusals = PacedWarnings()


def _log_refusals(conn: Any, direction: str, _version: Any, content_type: Any, msg_type: Any,
                  data: bytes) -> None:
    """Log every handshake the hub refuses (a certificate from another CA never reaches the
    app, so this is the only place that can say so), naming the certificate presented.

    Uses the SSL context's message callback (CPython's ``_msg_callback``, the hook behind
    ``openssl s_server -msg``); it must never raise.
    """
    try:
        if (direction == "read" and int(content_type) == 22 and int(msg_type) == 11
                and conn not in _presented):
            _presented[conn] = _first_certificate(data)
        elif direction == "write" and int(content_type) == 21 and len(data) >= 2 \
                and data[1] in ALERTS:
            # Once a minute at most per alert and certificate: anyone may start a handshake,
            # and each was a line of the journal.
            presented = _presented.get(conn, "none seen")
            said = _refusals.due(f"{ALERTS[data[1]]} {presented}")
            if said is not None:
                more = f" ({said} refused since the last line)" if said > 1 else ""
                log.warning("TLS handshake refused (alert %s); client certificate: %s%s",
                            ALERTS[data[1]], presented, more)
    except Exception:  # noqa: BLE001 - a logging hook must not break TLS
        return


def _first_certificate(message: bytes) -> str:
    """Subject and issuer of the first certificate in a TLS 1.3 Certificate message."""
    from cryptography import x509

    context_length = message[4]
    at = 5 + context_length + 3  # header, request context, certificate_list length
    length = int.from_bytes(message[at:at + 3], "big")
    cert = x509.load_der_x509_certificate(message[at + 3:at + 3 + length])
    return f"subject {cert.subject.rfc4514_string()}, issuer {cert.issuer.rfc4514_string()}"
