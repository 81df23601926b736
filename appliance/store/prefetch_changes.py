"""What a later message about a known prefetch request changes in it, by its state.

Owns: the updates of a ``prefetch_requests`` row that the same order, appointment or visit
sent again makes (:func:`update_known`), and the check at an attempt's end that the request
still asks for what that attempt searched for (:func:`searched_changed`). Called inside
:mod:`appliance.store.prefetch`'s transactions, on their connection. May not touch: files,
the network, or any other table. Split from store/prefetch.py (past 600 lines) when a
change of a running, fetched or failed request stopped being dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.store.prefetch import NewRequest


# The accession a message gives replaces the one known; an order's group that gives none
# (procedure[0] empty: no OBR-18 / IPC-1) carries its order number instead (ORC-3, else ORC-2:
# the current exam's accession at a RIS that writes it there, which the priors' choice leaves
# out), which only fills an accession not known. It replaced ACC123 with the order number at
# every status update (``ORC|SC`` without OBR-18), and at a re-order after a cancel: the
# current exam could be fetched as its own prior. Parameters: :func:`accession_params`.
KNOWN_ACCESSION = ("accession_number = CASE WHEN ? THEN coalesce(?, accession_number) "
                   "ELSE coalesce(accession_number, ?) END")


def accession_params(request: NewRequest) -> tuple[bool, str | None, str | None]:
    """The parameters of :data:`KNOWN_ACCESSION` for ``request``."""
    given = request.procedure is None or bool(request.procedure[0])
    return given, request.accession_number, request.accession_number


def update_known(conn: Any, request_id: int, request: NewRequest, due: float, at: float,
                 repeat: int) -> None:
    """The same order, appointment or visit again: counted, and what it now says is the
    request's, whatever its state but cancelled (see ``revive`` of
    :func:`appliance.store.prefetch._schedule`). A part the message does not give (a status
    update naming no modality, no exam time, no accession) keeps the one known.

    Before, only a pending request took the change: one whose fetch was running, or done,
    kept the CT and the time of the order as first sent after an ``ORC|XO`` made it an MR
    in two days, ACKed AA (an interface engine then never sends it again), and the MR's
    priors were never fetched. Now:

    - pending: its new time is its next attempt's (unless a failed attempt set a later one);
    - running: the attempt's end compares what it searched for (:func:`searched_changed`)
      and makes it pending again when the procedure changed or the exam moved beyond now;
    - fetched: pending again when the procedure changed, or the exam moved so that its
      priors are due later (their pins run from the fetch: ``prefetch.pin_days``);
    - failed: pending again, attempts reset, when anything it searches for changed.
    """
    row = conn.execute("SELECT state, attempts, scheduled_at, due_at, modality, body_part "
                       "FROM prefetch_requests WHERE id = ?", (request_id,)).fetchone()
    moved = request.scheduled_at is not None and request.scheduled_at != row["scheduled_at"]
    scheduled = request.scheduled_at if moved else row["scheduled_at"]
    due_at = due if moved else row["due_at"]
    modality = request.modality or row["modality"]
    body_part = request.body_part or row["body_part"]
    procedure_changed = (modality, body_part) != (row["modality"], row["body_part"])
    state = row["state"]
    if state == "cancelled":  # stays so (a worklist's poll must not undo the RIS's cancel)
        conn.execute("UPDATE prefetch_requests SET times_requested = times_requested + ?, "
                     "updated_at = ? WHERE id = ?", (repeat, at, request_id))
        return
    again = ((state == "fetched" and (procedure_changed or (moved and due_at > at)))
             or (state == "failed" and (procedure_changed or moved)))
    next_attempt = "next_attempt_at"
    if again:
        next_attempt = "max(?, ?)"
    elif state == "pending" and row["attempts"] == 0:
        next_attempt = "?"
    conn.execute(
        f"""UPDATE prefetch_requests SET times_requested = times_requested + ?, updated_at = ?,
               scheduled_at = ?, due_at = ?, modality = ?, body_part = ?,
               {KNOWN_ACCESSION},
               next_attempt_at = {next_attempt},
               state = CASE WHEN ? THEN 'pending' ELSE state END,
               attempts = CASE WHEN ? THEN 0 ELSE attempts END,
               finished_at = CASE WHEN ? THEN NULL ELSE finished_at END,
               last_error = CASE WHEN ? THEN NULL ELSE last_error END
           WHERE id = ?""",
        (repeat, at, scheduled, due_at, modality, body_part, *accession_params(request),
         *((due_at, at) if again else (due_at,) if next_attempt == "?" else ()),
         again, again, again, again, request_id))


def searched_changed(conn: Any, request_id: int, searched: dict[str, Any],
                      at: float) -> bool:
    """A running request that now asks for something else than its attempt searched for
    (``searched``: the row as claimed) is made pending again, the attempt not counted, due
    at its (new) due time or now: an ADT merge moved it to the surviving patient (ended as
    fetched, it held the temporary id's priors, none), an ``ORC|XO`` changed its modality or
    body part (the rule chose another exam's priors), or its exam moved beyond now (the
    priors' pins run from the fetch)."""
    return conn.execute(
        "UPDATE prefetch_requests SET state = 'pending', attempts = max(attempts - 1, 0), "
        "next_attempt_at = max(due_at, ?), updated_at = ? WHERE id = ? AND state = 'running' "
        "AND (patient_id != ? OR issuer != ? OR modality IS NOT ? OR body_part IS NOT ? "
        "OR due_at > ?)",
        (at, at, request_id, searched["patient_id"], searched["issuer"],
         searched["modality"], searched["body_part"], at)).rowcount > 0
