"""``pas doctor``'s check of the TLS certificates and CAs the configuration names.

Owns: one row per certificate file expired, unreadable or expiring within
:data:`~appliance.ops.certificates.SOON_DAYS`, else one row saying which expires first.
May not touch: anything but the files it is named (appliance/ops/certificates.py reads
them). The enrolment's own certificate is appliance/ops/doctor_hub.py's.
"""

from __future__ import annotations

from datetime import UTC, datetime

from appliance.config import Settings
from appliance.ops import certificates
from appliance.ops.doctor import Check

RENEW = ("renew it (the same key may stay), put the new file in place and restart PAS "
         "(systemctl restart pas)")
# The fleet CA is regional ops' (pas hub init): the site cannot renew it.
FLEET_CA = ("the hub's fleet CA is regional ops': ask them for the renewed one, then "
            "pas enroll --replace --hub URL")
# A CA file may be a bundle: its first certificate to expire counts, an old root included.
RENEW_CA = ("put the CA's renewed certificate in the file, and remove from a bundle the "
            "expired ones no peer chains to any more; then restart PAS (systemctl restart "
            "pas)")


def check_tls_certificates(settings: Settings, now: datetime | None = None) -> list[Check]:
    """Nothing when the configuration uses no certificate file."""
    now = now or datetime.now(UTC)
    used = certificates.in_use(settings)
    if not used:
        return []
    problems: list[Check] = []
    earliest: tuple[datetime, str] | None = None
    for cert in used:
        try:
            expires = certificates.first_expiry(cert.path)
        except (OSError, ValueError) as exc:
            problems.append(Check("TLS certificate", "fail", f"{cert.key}: cannot be read: "
                                  f"{exc}", f"point {cert.key} at the PEM file"))
            continue
        days = (expires - now).total_seconds() / 86400
        when = f"{expires:%Y-%m-%d %H:%M} UTC"
        fix = FLEET_CA if cert.key == "enrolment.ca" else RENEW_CA if cert.ca else RENEW
        if days < 0:
            problems.append(Check("TLS certificate", "fail",
                                  f"{cert.key} ({cert.path}) expired on {when}: its TLS "
                                  "handshakes fail", fix))
        elif days < certificates.SOON_DAYS:
            problems.append(Check("TLS certificate", "warn",
                                  f"{cert.key} ({cert.path}) expires on {when}, in "
                                  f"{days:.0f} days", fix))
        if earliest is None or expires < earliest[0]:
            earliest = (expires, cert.key)
    if problems:
        return problems
    assert earliest is not None
    expires, key = earliest
    return [Check("TLS certificates", "ok",
                  f"{len(used)} in use; the first to expire: {key}, on "
                  f"{expires:%Y-%m-%d} ({(expires - now).total_seconds() / 86400:.0f} days)")]
