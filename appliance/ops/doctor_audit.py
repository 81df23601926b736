"""``pas doctor``'s audit trail checks: whether it has a copy off the appliance, and whether
its hash chain holds.

Owns: those two verdicts. May not touch: state (the index is opened read-only; the chain is
recomputed by :func:`appliance.store.audit.verify_chain`, which writes nothing).
"""

from __future__ import annotations

from appliance.config import Settings
from appliance.ops.doctor import Check, _index
from appliance.words import counted, local_time

# The most rows doctor recomputes the chain of (about 10 us a row here: ~2 s). Past it the
# row says how to run the whole check: doctor is run on a call with the hospital's IT, and
# a year's trail of a busy site (a million rows and more) would hold it for tens of seconds.
DOCTOR_CHAIN_ROWS = 200_000


def check_audit_copy(settings: Settings) -> Check:
    """Whether the audit trail has a copy off this appliance. Its table refuses changes by
    trigger, which root can drop (and the journal is this host's too): a copy at the
    hospital's ATNA repository is what an auditor can trust. Said nowhere before."""
    audit = settings.audit
    if not audit.syslog_host:
        return Check("audit trail", "warn", "kept on this appliance only (its database and "
                     "journal): anyone with root here could change it unseen",
                     "send a copy to the hospital's ATNA repository: [audit] syslog_host "
                     "and syslog_ca (docs/operations.md, Audit trail)")
    return Check("audit trail", "ok", f"copied to {audit.syslog_host}:{audit.syslog_port} "
                  "(syslog over TLS)")


def check_audit_chain(settings: Settings, max_rows: int = DOCTOR_CHAIN_ROWS) -> Check | None:
    """The audit trail's hash chain recomputed (``pas audit verify``'s check): a row altered,
    removed or inserted outside PAS is a failure, named. Doctor did not look: a trail
    changed by someone who dropped its triggers showed nothing until an auditor ran the
    verification. A trail of more than ``max_rows`` rows is not recomputed here (the row
    says how long and what to run). None when the database is missing or unreadable (the
    database check says so)."""
    from appliance.store.audit import count_after, verify_chain

    with _index(settings) as db:
        if db is None:
            return None
        try:
            rows = count_after(db, -(2**63))  # every row, one slipped in below 1 too
            if rows > max_rows:
                return Check("audit chain", "ok", f"{counted(rows, 'row')}: not recomputed "
                             f"here (more than {max_rows:,}; about "
                             f"{max(1, round(rows / 100_000))} s)",
                             "pas audit verify checks the whole trail")
            check = verify_chain(db)
        except Exception as exc:  # unreadable: the database check names the damage
            return Check("audit chain", "warn", f"not checked: {exc}",
                         "pas audit verify says more")
    if check.ok:
        return Check("audit chain", "ok", "no rows yet" if check.last_id is None else
                     f"{counted(check.rows + check.before_upgrade, 'row')} chained, the last "
                     f"(ID {check.last_id}) at "
                     f"{local_time(check.last_at or 0)}")
    where = (f"before row {(check.upgrade_id or 0) + 1}" if check.old_rows_changed
             else f"at row {check.broken_id}")
    return Check("audit chain", "fail", f"broken {where}: {check.problem}",
                 "the trail was changed outside PAS: keep this appliance as it is and compare "
                 "with its copies (journald's AUDIT_CHAIN, the syslog collector); pas audit "
                 "verify names the row (docs/operations.md, Audit trail)")
