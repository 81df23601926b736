"""An HL7 order in, its acknowledgement out: the request committed before the ACK exists.

Owns: what one HL7 message from the RIS does to the prefetch state (a new request, a cancel,
a resend recognised, a refusal audited) and the ACK or NAK that answers it. The message is
read by :mod:`appliance.prefetch.messages`; the state is written through
:mod:`appliance.store.prefetch` in one transaction per message. May not touch: the network
(the MLLP listener carries the bytes) or the fetching of priors (the service's scheduler
takes the requests from the database).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from appliance.prefetch.acks import build_ack, field_or_empty, msh_alone
from appliance.prefetch.charsets import site_default
from appliance.prefetch.merges import interpret_merges, is_correction, is_merge
from appliance.prefetch.messages import (
    NotUsed,
    PrefetchOrder,
    Refusal,
    _msh_field,
    interpret,
    parse_message,
    refuse_other_processing,
)
from appliance.store import audit, prefetch_merge
from appliance.store import prefetch as store
from appliance.store.db import Database
from appliance.words import counted

log = logging.getLogger("pas.prefetch")


def handle(db: Database, text: str, source: str,
           due_at: Callable[[float | None], float],
           site_issuers: Collection[str] = (),
           processing_ids: Collection[str] = ("P",),
           encoding: str = "utf-8") -> tuple[str, bool]:
    """The ACK for one HL7 message, and whether a request was scheduled (the scheduler is
    then woken). ``due_at``: when a request for an exam at that time is due. A resent
    message is recognised and ACKed again, changing nothing; a refused one is audited and
    NAKed with the reason; an internal error is still answered (AE), never left hanging.
    ``site_issuers``: which PID-3 repetition is the patient's (:func:`messages.interpret`);
    ``processing_ids``: the MSH-11 values acted on (``hl7.processing_ids``); ``encoding``:
    ``hl7.encoding``, the set ``text`` was decoded with when its MSH-18 names none read,
    hence its ``\\Xhh\\`` escapes' too (they were read as UTF-8 whatever the site's set).

    An ORM/OMI/OMG of several order groups is one ACK and one transaction: each group
    schedules or cancels its own request (its order number and requested procedure), or, one
    group refused, none does."""
    with site_default(encoding):
        return _handle(db, text, source, due_at, site_issuers, processing_ids)


def _handle(db: Database, text: str, source: str, due_at: Callable[[float | None], float],
            site_issuers: Collection[str], processing_ids: Collection[str]) -> tuple[str, bool]:
    message = None
    try:
        message = parse_message(text)
        refuse_other_processing(message, processing_ids)
        if is_merge(message):
            return _merge(db, message, source, site_issuers), False
        orders = _distinct(interpret(message, site_issuers=site_issuers), source)
        actions: list[store.NewRequest | store.Cancel] = [
            store.Cancel(order.dedup_key, _procedure(order)) if order.cancel
            else store.NewRequest(
                order.dedup_key, "hl7", order.patient_id, order.issuer,
                order.accession_number, order.modality, order.body_part, order.scheduled_at,
                due_at(order.scheduled_at), _procedure(order), order.update_only)
            for order in orders]
        first = orders[0]
        sender = _sender(message)
        what = "; ".join(("cancel " if order.cancel else "") + order.dedup_key
                         for order in orders)
        recorded = store.record_message(
            db, first.message_key, first.message_type, "AA", actions=actions,
            audit_row={"actor": source or None, "target": what[:1000],
                       "detail": f"{first.message_type} MSH-10 {first.control_id} from "
                                 f"{sender}",
                       "patient": first.patient_id})
        if not recorded.first:
            return _duplicate(message, first.message_type, first.control_id, source), False
        _warn_reused(first.control_id, recorded.reused_for,
                     "; ".join(order.dedup_key for order in orders), source)
        if first.update_only and not recorded.all_scheduled:  # ADT^A08: one order
            log.info("HL7 %s %s from %s: patient %s, no request for %s: nothing to update",
                     first.message_type, first.control_id, source, first.patient_id,
                     first.dedup_key)
            return build_ack(message, "AA", f"no prefetch request for {first.dedup_key}: an "
                             f"{first.message_type} updates the one an ADT^A04 made, and "
                             "makes none"), False
        scheduled = iter(recorded.all_scheduled)
        for number, order in enumerate(orders, 1):
            of = f" (order {number} of {len(orders)})" if len(orders) > 1 else ""
            if order.cancel:
                log.info("HL7 %s: order %s cancelled%s", order.message_type, order.dedup_key,
                         of)
                continue
            result = next(scheduled)
            log.info("HL7 %s %s from %s: patient %s, %s request %s%s", order.message_type,
                     order.control_id, source, order.patient_id,
                     "new" if result.created else "known", result.request_id, of)
        return build_ack(message, "AA"), bool(recorded.all_scheduled)
    except NotUsed as unused:  # an ADT feed's other events: accepted, nothing done
        log.debug("HL7 %s %s from %s: %s", unused.message_type, unused.control_id, source,
                  unused)
        return build_ack(message, "AA", str(unused)), False
    except Refusal as refusal:
        if message is None:  # refused before it was parsed whole: its MSH alone
            message = msh_alone(text)
        log.warning("HL7 from %s refused (%s): %s", source, refusal.ack_code, refusal.reason)
        audit_refusal(db, source, refusal.reason, message, refusal.message_type,
                      refusal.control_id)
        return build_ack(message, refusal.ack_code, refusal.reason, refusal.error_code,
                         refusal.control_id), False
    except Exception as exc:  # never leave the RIS without an answer
        log.exception("HL7 from %s: internal error", source)
        return build_ack(message, "AE", f"internal error: {exc}", "207"), False


def audit_refusal(db: Database, source: str, reason: str, message: Any,
                  message_type: str = "", control_id: str = "") -> None:
    """The ``hl7`` audit row of a refused message: what it was and who sent it (MSH-9,
    MSH-10, MSH-3^MSH-4, read from ``message``, its MSH alone when no more was read), so
    that it can be matched to the interface engine's error queue. The row said the peer's
    address, the reason and the type only."""
    if message is not None:
        message_type = message_type or "^".join(
            part for part in (field_or_empty(message, "MSH.F9.R1.C1"),
                              field_or_empty(message, "MSH.F9.R1.C2")) if part)
        control_id = control_id or _msh_field(message, 10)
    sender = _sender(message) if message is not None else ""
    said = [message_type, f"MSH-10 {control_id}" if control_id else "",
            f"from {sender}" if sender.strip("^") else ""]
    audit.record(db, "hl7", actor=source or None, outcome=f"failure: {reason}",
                 detail=" ".join(part for part in said if part) or None)


def _sender(message: Any) -> str:
    """MSH-3^MSH-4: who sent the message, as its audit row names it."""
    return "^".join(_msh_field(message, n) for n in (3, 4))


def _merge(db: Database, message: Any, source: str, site_issuers: Collection[str]) -> str:
    """An ADT merge (A40, A34, A36, A18) or identifier change (A47): the prior patient's
    (MRG-1) requests not yet done moved to the surviving patient (PID-3,
    :mod:`appliance.store.prefetch_merge`), then the ACK, whose MSA-3 says how many moved. A
    merge naming a patient PAS has no request for is ACKed too: the RIS did nothing wrong."""
    merges = interpret_merges(message, site_issuers)
    first = merges[0]
    recorded = prefetch_merge.record_merges(
        db, first.message_key, first.message_type,
        [prefetch_merge.Merge(m.prior_id, m.prior_issuer, m.patient_id, m.issuer,
                              correction=is_correction(m.message_type))
         for m in merges], source)
    if not recorded.first:
        return _duplicate(message, first.message_type, first.control_id, source)
    _warn_reused(first.control_id, recorded.reused_for,
                 "; ".join(m.merge.describe() for m in recorded.merged), source)
    said = []
    for merged in recorded.merged:
        moved = counted(len(merged.moved), "prefetch request")
        log.info("HL7 %s %s from %s: %s: %s moved%s", first.message_type,
                 first.control_id, source, merged.merge.said(), moved,
                 f" ({', '.join(f'#{n}' for n in merged.moved)})" if merged.moved else "")
        text = f"{merged.merge.said()}: {moved} moved"
        if merged.folded:
            log.info("HL7 %s %s: %s of %s cancelled, %s already held its order: %s",
                     first.message_type, first.control_id,
                     counted(len(merged.folded), "request"), merged.merge.prior_id,
                     merged.merge.survivor,
                     ", ".join(f"#{old} (held by #{holder})" for old, holder in merged.folded))
            text += (f", {counted(len(merged.folded), 'request')} cancelled "
                     f"({merged.merge.survivor} held the same order)")
        said.append(text)
    return build_ack(message, "AA", "; ".join(said))


def _procedure(order: PrefetchOrder) -> tuple[str, str] | None:
    """The requested procedure an order's request is found by (None: not an order)."""
    return order.procedure if order.dedup_key.startswith("order:") else None


def _distinct(orders: list[PrefetchOrder], source: str) -> list[PrefetchOrder]:
    """The orders of a message, each procedure of each order (cancel or not) once: groups
    naming the same order number and the same procedure (or one not told apart from it,
    :func:`store.procedures_compatible`) are one order (scheduled twice it was counted as
    requested twice), the first group's modality, logged. Groups of one order number with
    distinct accessions or requested procedure IDs (IHE SWF: a CT chest and an MR knee of
    one order) are requests of their own."""
    kept: list[PrefetchOrder] = []
    for order in orders:
        same = next((earlier for earlier in kept if earlier.dedup_key == order.dedup_key
                     and earlier.cancel == order.cancel and store.procedures_compatible(
                         earlier.procedure, order.procedure)), None)
        if same is not None:
            log.warning("HL7 %s %s from %s: two order groups name order %s and procedure "
                        "%s: one request (the first group's modality %s; the other's %s)",
                        order.message_type, order.control_id, source, order.dedup_key,
                        "^".join(order.procedure).strip("^") or "(none given)",
                        same.modality, order.modality)
            continue
        kept.append(order)
    return kept


def _warn_reused(control_id: str, earlier: str | None, order: str, source: str) -> None:
    if earlier is not None:
        log.warning("HL7 from %s: control id %s (MSH-10) was already used for %s; this message "
                    "names %s: taken as a new message (did the RIS restart its numbering?)",
                    source, control_id, earlier, order)


def _duplicate(message: Any, message_type: str, control_id: str, source: str) -> str:
    """A message already recorded (a resend): ACKed again, nothing changed."""
    log.info("HL7 %s %s from %s: already processed", message_type, control_id, source)
    return build_ack(message, "AA", "duplicate message: already processed")
