"""The holdings question and the check of the hub's answer (docs/protocol.md, "Holdings").

Owns: which instances of a job are worth asking about, the question's shape, and what a
signed statement must be before a single instance is confirmed on it. May not touch: the
network (``client.HubClient.holdings``), the database (the caller confirms).

Only instances start-up recovery adopted are asked about: a file that had no index row
(``pas cache rebuild-index``, a restore from ``pas backup``, a lost commit) may have been
confirmed under the index that was lost. An instance received once and never sent is not,
so the normal path costs no round trip.

The statement is checked as a receipt is (the hub's server-key signature over its other
fields, with the certificate the hub presented on the TLS connection), then: it says it is
a holdings statement (a receipt is not one), for this study, answering this question (the
nonce sent with it), and names only pairs that were asked about. Anything else: nothing is
confirmed (invariant 2 rests on the hub's signature, never on an unsigned or stray answer).
Its ``region_instances`` (:func:`region_pairs`) are the region's from another site: a prior
this site fetched, confirmed and never uploaded as this site's own.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

from appliance.transfer.client import ReceiptInvalid

# ``instances.source_address`` of a file start-up recovery adopted back into the index
# (appliance/ops/recovery.py passes it as the receive path's source).
ADOPTED = "recovery"
STATEMENT = "holdings"


class StatementInvalid(ReceiptInvalid):
    """A holdings statement that cannot be relied on: nothing is confirmed from it."""


def may_be_held(rows: Sequence[Any]) -> list[Any]:
    """The rows not yet sent that start-up recovery adopted: those the region may hold."""
    return [r for r in rows if r["sent_at"] is None and r["source_address"] == ADOPTED]


def question(study_uid: str, rows: Sequence[Any]) -> dict[str, Any]:
    """The body of ``POST /api/v1/holdings`` for ``rows`` of ``study_uid``, with a new nonce."""
    return {"study_uid": study_uid, "nonce": secrets.token_urlsafe(18),
            "instances": [{"sop_instance_uid": r["sop_instance_uid"], "sha256": r["sha256"]}
                          for r in rows]}


def held_pairs(statement: dict[str, Any], asked: dict[str, Any],
               verify: Callable[[dict[str, Any]], None]) -> dict[tuple[str, str], bool]:
    """The (SOP Instance UID, SHA-256) pairs a verified statement says the region holds, each
    with whether it is the region's last word on its UID (``last``: no later version of it
    went to the region; absent, from a hub that did not say, taken as the last). A held pair
    that is not the last is confirmed (its bytes are there) but sent again, for the region
    to end with what this site holds as current. ``verify``: the receipts' signature check
    (``HubClient.verify``). Raises :class:`StatementInvalid` naming what is wrong."""
    study = asked["study_uid"]
    try:
        verify(statement)
    except ReceiptInvalid as exc:
        raise StatementInvalid(f"the hub's holdings statement for study {study} does not "
                               f"verify ({exc}): nothing confirmed from it") from None
    if statement.get("statement") != STATEMENT:
        raise StatementInvalid(f"the hub's answer about study {study} is not a holdings "
                               f"statement (says {statement.get('statement')!r})")
    if statement.get("study_uid") != study or statement.get("nonce") != asked["nonce"]:
        raise StatementInvalid(f"the hub's holdings statement answers another question "
                               f"(study {statement.get('study_uid')}), not this one about "
                               f"study {study}")
    try:
        pairs = {(str(i["sop_instance_uid"]), str(i["sha256"])): i.get("last", True) is True
                 for i in statement.get("instances", [])}
    except (KeyError, TypeError, AttributeError):
        raise StatementInvalid(f"the hub's holdings statement for study {study} lists an "
                               "instance without its UID or SHA-256") from None
    asked_pairs = {(i["sop_instance_uid"], i["sha256"]) for i in asked["instances"]}
    stray = sorted(set(pairs) - asked_pairs)
    if stray:
        raise StatementInvalid(f"the hub's holdings statement for study {study} names "
                               f"{len(stray)} instance(s) not asked about, e.g. {stray[0][0]}")
    return pairs


def region_pairs(statement: dict[str, Any], asked: dict[str, Any]) -> set[tuple[str, str]]:
    """The asked pairs a statement (already checked by :func:`held_pairs`) says the region's
    archive holds with those bytes although this site never sent them (``region_instances``:
    another site's study this one fetched, a prior, adopted again after a rebuilt index).
    Absent (an older hub, or an archive whose bytes the hub cannot know): none. A pair also
    listed as this site's own is this site's own. Raises :class:`StatementInvalid` on an
    entry without its UID or SHA-256, or one not asked about."""
    study = asked["study_uid"]
    entries = statement.get("region_instances", [])
    try:
        pairs = {(str(i["sop_instance_uid"]), str(i["sha256"])) for i in entries}
    except (KeyError, TypeError, AttributeError):
        raise StatementInvalid(f"the hub's holdings statement for study {study} lists a "
                               "region instance without its UID or SHA-256") from None
    asked_pairs = {(i["sop_instance_uid"], i["sha256"]) for i in asked["instances"]}
    stray = sorted(pairs - asked_pairs)
    if stray:
        raise StatementInvalid(f"the hub's holdings statement for study {study} names "
                               f"{len(stray)} region instance(s) not asked about, e.g. "
                               f"{stray[0][0]}")
    own = {(str(i.get("sop_instance_uid")), str(i.get("sha256")))
           for i in statement.get("instances", []) if isinstance(i, dict)}
    return pairs - own
