"""Why a call across the WAN failed, in the words the uplink, the prefetch and ``pas doctor``
share: the link's (no connection, or one that went silent or broke: wait for the link, count
no attempt), or trust's (a certificate refused by either end, or an expired one of this
appliance: a person must act, and no job should fail for it).

Owns: reading an exception's chain of causes for those two kinds. May not touch: any client,
job or the index; it classifies, its callers decide. Split from ``transfer/client.py`` so
that the classification reads on its own and the client stays one concern.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx


def caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` or any of its causes (``__cause__``, else ``__context__``) is a
    ``kind``: httpx wraps httpcore's errors, which wrap the socket's and ssl's."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def link_down(exc: BaseException) -> bool:
    """True when a failure is the link's: somewhere in its causes, no connection to the hub
    (or the region behind it), or one that went silent or broke (httpx's transport errors),
    rather than an answer refusing or failing the request. Such failures say nothing about
    the work that met them: the uplink and the prefetch wait for the link instead of
    counting them as attempts."""
    return caused_by(exc, httpx.TransportError)


# Why a hub refuses a client certificate (its answer's ``error``), and the OpenSSL reasons
# of the alerts a TLS peer sends when it refuses one at the handshake.
_REFUSED_CERTIFICATE_ERRORS = ("certificate_revoked", "certificate_superseded",
                               "certificate_unknown", "certificate_expired",
                               "client_certificate_required")
# What each alert means for this appliance's certificate (OpenSSL's verify errors map to
# them: an unknown issuer to unknown_ca, a signature that does not verify to decrypt_error,
# a certificate not yet valid to bad_certificate), said for the person who must act.
_REFUSED_CERTIFICATE_ALERTS = {
    "CERTIFICATE_REVOKED": "revoked",
    "CERTIFICATE_EXPIRED": "expired, by the peer's clock",
    "CERTIFICATE_UNKNOWN": "not accepted",
    "CERTIFICATE_REQUIRED": "required and not presented",
    "BAD_CERTIFICATE": "bad, or not yet valid by the peer's clock",
    "UNKNOWN_CA": "issued by a CA the peer does not trust",
    "DECRYPT_ERROR": ("its signature does not verify against the peer's CA (a CA of the same "
                      "name but another key: a re-created fleet CA?)"),
    "UNSUPPORTED_CERTIFICATE": "of a kind the peer does not support",
}


def trust_problem(exc: BaseException) -> str | None:
    """What keeps the two ends of a TLS link from trusting each other, if that is the
    failure (None otherwise): this end refused the peer's certificate (expired, another CA,
    a name it does not carry), the peer refused this end's at the handshake (a TLS alert),
    or the hub answered that it no longer accepts it (403 ``certificate_revoked``).

    Such a failure is neither the job's nor the link's: waiting does not cure it and no
    job should fail for it (every queued study would); it needs a person, a new enrolment
    or a CA put right, and the queue must then go on by itself."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        refusal = proxy_refusal(current)
        if refusal is not None:
            return refusal
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"this appliance does not trust the peer's certificate: " \
                   f"{current.verify_message or current.reason}"
        reason = str(current.reason or "") if isinstance(current, ssl.SSLError) else ""
        meaning = next((said for alert, said in _REFUSED_CERTIFICATE_ALERTS.items()
                        if "ALERT_" + alert in reason), None)
        if meaning is not None:
            return f"the peer refused this appliance's certificate at the TLS handshake: " \
                   f"{meaning} ({reason.lower()})"
        # The hub's refusal, whichever client met it (uploads: HubRefused; the region's
        # reads and the downloads: RegionError), keeps the answer's status and body.
        body = getattr(current, "body", None)
        if getattr(current, "status", None) in (401, 403) and isinstance(body, dict) and \
                body.get("error") in _REFUSED_CERTIFICATE_ERRORS:
            if body["error"] == "certificate_superseded":
                return ("the hub refuses this appliance's certificate (certificate_superseded): "
                        "a newer certificate of this site is in use, enrolled since on this "
                        "appliance or on another one")
            return f"the hub refuses this appliance's certificate ({body['error']})"
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def proxy_refusal(exc: BaseException, towards: str = "the hub",
                  port: str = "the hub's port") -> str | None:
    """The hospital's proxy (``hub.proxy``) refusing this appliance's credentials (401,
    407) or the tunnel to the hub's port (403), in words saying who acts; None for any other
    failure (a proxy that cannot reach the hub, 502 or 504, is the link's). A person must
    act here too (the network team, or the configuration's proxy credentials): retried
    like a failed link, a proxy checking its credentials against the hospital's directory
    locked the service account within minutes (review s42 F1). ``towards``, ``port``: the
    peer the tunnel was for, when not the hub (a STOW-RS destination ``through_proxy``)."""
    if not isinstance(exc, httpx.ProxyError):
        return None
    answer = str(exc)
    if answer.startswith(("401", "407")):
        return (f"the hospital's proxy refuses this appliance's credentials ({answer}): "
                "check hub.proxy_username and hub.proxy_password with the network team")
    if answer.startswith("403"):
        return (f"the hospital's proxy refuses the tunnel to {towards} ({answer}): it must "
                f"allow CONNECT to {port}; ask the network team")
    return None


TRUST_HINT = ("`pas doctor` checks the certificates and the proxy; a revoked, superseded or "
              "expired certificate is replaced with `pas enroll --replace` and a restart of PAS")


def credentials_refused(exc: BaseException, enrolment: Any | None) -> str | None:
    """Why the hub, or this end, refuses the link's credentials, if that is the failure:
    :func:`trust_problem`, or, when the hub closed the connection at the handshake (a link
    down by every sign), this appliance's own certificate having expired (``enrolment``:
    an :class:`~appliance.transfer.enrolment.Enrolment`, read for its dates). The uplink and
    the prefetch both ask it, so that they name the same cause the same way."""
    problem = trust_problem(exc)
    handshake = problem is not None or link_down(exc)
    expired = enrolment.expired_at() if enrolment is not None and handshake else None
    if expired is not None:  # the plainest word: the date (a peer's alert, if any, follows)
        return (f"this appliance's certificate expired on {expired:%Y-%m-%d %H:%M} UTC ("
                f"{problem or 'the hub closes the connection at the TLS handshake'})")
    return problem
