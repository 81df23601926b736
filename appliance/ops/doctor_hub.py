"""``pas doctor``'s checks of the enrolment, the certificate and the regional hub.

Owns: reading the enrolment and the client certificate's dates, one ``/api/v1/whoami`` to
the hub (mutual TLS) and its Date header against this clock, and saying who acts on each
finding. May not touch: the index beyond counting what waits for the enrolment, nor the
hub's records. Split from appliance/ops/doctor.py when it passed 600 lines.
"""

from __future__ import annotations

import ssl
import time
from email.utils import parsedate_to_datetime

import httpx

from appliance.config import Settings
from appliance.ops.doctor import (
    ENROL_AGAIN,
    HUB_TIMEOUT_S,
    MAX_SKEW_FAIL_S,
    MAX_SKEW_WARN_S,
    Check,
    _index,
)
from appliance.transfer.http import http_client, hub_proxy, proxy_words, shown_url
from appliance.words import counted


def check_enrolment(settings: Settings) -> list[Check]:
    from appliance.config import configured_site
    from appliance.ops.metrics import certificate_days_left
    from appliance.transfer.enrolment import (
        EnrolmentError,
        SiteMismatch,
        check_site,
        load_enrolment,
    )

    try:
        enrolment = load_enrolment(settings.home)
    except EnrolmentError as exc:
        return [Check("enrolment", "fail", str(exc), ENROL_AGAIN)]
    if enrolment is None:
        return [Check("enrolment", "warn", "not enrolled with a regional hub"
                      + _awaiting_enrolment(settings),
                      "ask regional ops for a token, then: pas enroll --hub URL (it asks for "
                      "the token; or --token-file FILE), then restart PAS")]
    checks = [Check("enrolment", "ok", f"site {enrolment.site}, hub {shown_url(enrolment.url)}")]
    try:  # the configuration's site is the certificate's: pas run refuses otherwise
        check_site(settings.home, configured_site(settings))
    except SiteMismatch as exc:
        checks.append(Check("site", "fail", exc.problem, exc.way_out))
    except EnrolmentError:
        pass  # read above: the same files
    try:
        days = certificate_days_left(settings.home)
    except (OSError, ValueError) as exc:
        return checks + [Check("certificate", "fail", f"unreadable: {exc}",
                               ENROL_AGAIN)]
    if days is None or days < 0:
        checks.append(Check("certificate", "fail", "client certificate missing or expired",
                            ENROL_AGAIN))
    elif days < 30:
        checks.append(Check("certificate", "warn", f"expires in {counted(round(days), 'day')}",
                            f"renew it before it expires: {ENROL_AGAIN}"))
    else:
        checks.append(Check("certificate", "ok",
                            f"valid for {counted(round(days), 'more day')}"))
    hub_checks = check_hub(enrolment, hub_proxy(settings.hub))
    refused = next((c for c in hub_checks if c.name == "hub" and c.verdict == "fail"
                    and c.detail.startswith(REFUSED_BY_HUB)), None)
    if refused is not None:  # "certificate ok, valid for 825 more days" two rows above it
        checks[-1] = Check("certificate", "fail", f"valid by its dates, but the hub refuses "
                           f"it ({refused.detail.split('(', 1)[1]}", refused.fix)
    checks.extend(hub_checks)
    return checks


def _awaiting_enrolment(settings: Settings) -> str:
    """What waits for the enrolment to go to the region (appliance/store/awaiting_hub.py),
    said after "not enrolled"; nothing when none does or the index cannot be read (the
    database check says why)."""
    from appliance.store import awaiting_hub

    with _index(settings) as db:
        if db is None:
            return ""
        try:
            instances, studies = awaiting_hub.waiting(db)
        except Exception:  # any failure is the database check's finding
            return ""
    if not instances:
        return ""
    return (f": {counted(instances, 'instance')} of {counted(studies, 'study', 'studies')} "
            "received meanwhile wait for it to go to the region")


def check_hub(enrolment: object, proxy: httpx.Proxy | None = None) -> list[Check]:
    """Mutual TLS to the hub (``/api/v1/whoami``), and the clock against the hub's Date.
    ``proxy``: the hospital's proxy the connection goes through (``hub.proxy``)."""
    url = enrolment.url  # type: ignore[attr-defined]
    shown = shown_url(url)
    try:
        with http_client(base_url=url, verify=enrolment.ssl_context(),  # type: ignore[attr-defined]
                         timeout=HUB_TIMEOUT_S, proxy=proxy) as client:
            sent = time.time()
            response = client.get("/api/v1/whoami")
            received = time.time()
    except (httpx.HTTPError, OSError) as exc:
        if proxy is not None:
            return [_proxy_failure(shown, proxy, exc)]
        return [_hub_failure(shown, exc)]
    checks = []
    refusal = _certificate_refusal(response)
    if response.status_code == 200:
        checks.append(Check("hub", "ok", f"{shown} knows us as {response.json().get('site')!r} "
                            f"({(received - sent) * 1000:.0f} ms{proxy_words(proxy)})"))
    elif refusal is not None:  # the hub's words, not its JSON cut at 200 characters
        error, detail = refusal
        checks.append(Check("hub", "fail", f"{REFUSED_BY_HUB} ({error}): {detail}",
                            f"ask regional ops for a token, then {ENROL_AGAIN}"))
    else:
        checks.append(Check("hub", "fail", f"{shown} answered {response.status_code}: "
                            f"{response.text[:200]}",
                            f"certificate revoked or unknown: {ENROL_AGAIN}"))
    date = response.headers.get("date")
    if date:
        skew = (sent + received) / 2 - parsedate_to_datetime(date).timestamp()
        # The Date header has 1 s resolution: allow for it.
        detail = f"{skew:+.1f} s against the hub"
        if abs(skew) > MAX_SKEW_FAIL_S:
            checks.append(Check("clock", "fail", detail, "enable NTP: timedatectl set-ntp true"))
        elif abs(skew) > MAX_SKEW_WARN_S:
            checks.append(Check("clock", "warn", detail, "enable NTP: timedatectl set-ntp true"))
        else:
            checks.append(Check("clock", "ok", detail))
    return checks


# How the hub row begins when the hub refuses this appliance's certificate (403
# certificate_revoked, _unknown, _superseded); the certificate row then says so too.
REFUSED_BY_HUB = "the hub refuses this appliance's certificate"


def _certificate_refusal(response: httpx.Response) -> tuple[str, str] | None:
    """(error, detail) of the hub's 403 refusing the client certificate, else None."""
    if response.status_code != 403:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    error = str(body.get("error", "")) if isinstance(body, dict) else ""
    if not error.startswith("certificate_"):
        return None
    return error, str(body.get("detail", ""))[:300]


def _proxy_failure(url: str, proxy: httpx.Proxy, exc: BaseException) -> Check:
    """Why the hub could not be asked through the hospital's proxy: the proxy unreachable,
    or refusing the tunnel (its status says why: credentials, a port it does not allow, the
    hub out of its reach), are the network team's to look at, not the WAN's or the hub's;
    what happens inside the tunnel (TLS, the hub's answer) reads as without a proxy."""
    through = shown_url(proxy.url)
    if isinstance(exc, httpx.ProxyError):
        status = str(exc)
        if status.startswith(("407", "401")):  # tinyproxy's BasicAuth answers 401
            fix = ("check hub.proxy_username and hub.proxy_password with the hospital's "
                   "network team")
        elif status.startswith("403"):
            fix = (f"ask the network team to let the proxy open tunnels (CONNECT) to "
                   f"{url.split('://', 1)[-1]}")
        else:
            fix = ("the proxy cannot reach the hub: ask the network team, then regional "
                   "ops whether the hub is up")
        return Check("hub", "fail", f"the proxy {through} refused the tunnel to {url}: "
                     f"{status}", fix)
    if isinstance(exc, httpx.ConnectError) and _trust_problem(exc) is None:
        if _caused_by(exc, ssl.SSLError):  # the tunnel opened; TLS inside it did not
            return Check("hub", "fail", f"the tunnel to {url} through the proxy {through} "
                         f"opened, but the TLS handshake with the hub failed: {exc}",
                         "a proxy that filters or inspects TLS must let the hub's name pass "
                         "untouched: ask the network team; else regional ops (the hub)")
        return Check("hub", "fail", f"cannot reach the proxy {through} (hub.proxy): {exc}",
                     "check hub.proxy, and that the proxy is up: ask the network team")
    if isinstance(exc, httpx.TimeoutException):
        return Check("hub", "fail", f"no answer from {url} through the proxy {through} "
                     f"within {HUB_TIMEOUT_S:.0f} s ({type(exc).__name__})",
                     "ask the network team whether the proxy is up and reaches the hub, "
                     "then regional ops for the hub's status")
    return _hub_failure(url, exc)


def _trust_problem(exc: BaseException) -> str | None:
    from appliance.transfer.link_failures import trust_problem

    return trust_problem(exc)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    from appliance.transfer.link_failures import caused_by

    return caused_by(exc, kind)


def _hub_failure(url: str, exc: BaseException) -> Check:
    """Why the hub could not be asked, and who acts: a certificate one end refuses (the
    hub's TLS alert, or the hub's own certificate this end cannot verify) needs a new
    enrolment or the CA put right, not the WAN looked at, which the connection errors said.
    ``url``: as a doctor row may show it (transfer.http.shown_url)."""
    from appliance.transfer.link_failures import trust_problem

    problem = trust_problem(exc)
    if problem is not None:
        return Check("hub", "fail", f"{url}: {problem}",
                     f"certificates: {ENROL_AGAIN}; if the hub's own certificate is the one "
                     "refused, ask regional ops which fleet CA it now uses")
    if isinstance(exc, httpx.ConnectError) and "refused" in str(exc).lower():
        # The hub's host answered: nothing listens on the port. The WAN and DNS are fine;
        # "check the WAN link, the firewall and DNS" sent the site's IT the wrong way.
        return Check("hub", "fail", f"cannot reach {url}: {exc} (the hub's host answered "
                     "but nothing listens on that port)",
                     "the hub is stopped, or a firewall rejects the port: ask regional ops")
    if isinstance(exc, httpx.ConnectError):
        return Check("hub", "fail", f"cannot reach {url}: {exc}",
                     "check the WAN link, the firewall (outgoing HTTPS to the hub) and DNS")
    if isinstance(exc, httpx.TimeoutException):
        # No refusal, no error: packets to the hub vanish (a WAN down, a firewall dropping
        # them) or the hub is hung. "timed out" alone said neither what nor where.
        return Check("hub", "fail", f"no answer from {url} within {HUB_TIMEOUT_S:.0f} s "
                     f"({type(exc).__name__}): the hub is unreachable",
                     "check the WAN link and the firewall (outgoing HTTPS to the hub), then "
                     "the hub's status with regional ops")
    return Check("hub", "fail", f"{url}: {exc}", "check the link and the hub's status")
