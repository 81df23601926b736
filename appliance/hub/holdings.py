"""``POST /api/v1/holdings``: which instances of a study the region already holds for this site,
with the same bytes, as a statement signed like a receipt (docs/protocol.md, "Holdings").

Why: an appliance whose index was rebuilt from its spool (``pas cache rebuild-index``) or
restored from a backup has lost the region's confirmations; start-up recovery adopts its spool
files and routes their studies again. Without this question every bucket of every study went
over the WAN a second time (a 1.5 TB cache on a 20 Mbit/s line: a week of saturated uplink),
for bytes the region holds. The appliance asks only about instances that may have been
confirmed before (those start-up recovery adopted), never in the normal path.

Owns: reading and checking the question (bounded, strict), the answer and its signature.
May not touch: SQL (``appliance.store.hub``), the transfers' routes.

The answer rests on the hub's own records of what it confirmed: the receipts of this site's
committed transfers of that study, each (SOP Instance UID, SHA-256) pair exactly as a receipt
named it; with an archive other than the embedded one (which keeps every version), only the
last version receipted of each UID (an overwriting archive holds no other). Only the
calling site's: sites never see each other's transfers (a site could otherwise learn that
another hospital sent a given study), and a receipt is the hub's word
to the site that sent the instance, the only word invariant 2 lets a site delete on. The
statement is signed by the hub's server key, as a receipt is, so that the appliance confirms
instances on the hub's signature and never on an unsigned answer.

``region_instances`` (embedded archive only) adds the asked pairs the archive holds, those
exact bytes, that this site never sent: another site's study it fetched from the region (a
prior) and adopted again after a rebuilt index. Without it the appliance uploaded every prior
of its cache as its own study, and the region's receipts said this site sent them. Each entry
is a bare pair (no site, no transfer): the asker already holds the bytes it names.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from appliance.hub.app import BodyTooLarge, problem, read_body_limited
from appliance.hub.transfers import (
    _BadEncoding,
    _decoded_body,
    _validation_detail,
    json_answer,
)
from appliance.store import hub as store
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.hub.app import Hub

log = logging.getLogger("pas.hub.holdings")

HOLDINGS_PATH = "/api/v1/holdings"
STATEMENT = "holdings"  # what a signed holdings statement says it is (never a receipt)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class AskedInstance(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    sop_instance_uid: str = Field(min_length=1, max_length=64)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not SHA256_HEX.fullmatch(value):
            raise ValueError("must be 64 lowercase hex digits")
        return value


class HoldingsQuestion(BaseModel):
    """Strict, as a manifest: a value of the wrong JSON type is refused naming its path."""

    model_config = ConfigDict(extra="ignore", strict=True)
    study_uid: str = Field(min_length=1, max_length=64)
    # Chosen by the appliance for this question and echoed in the signed statement: the
    # statement answers this question, not an earlier one.
    nonce: str = Field(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    instances: list[AskedInstance] = Field(min_length=1)


def holdings_statement(hub: Hub, site: str, question: HoldingsQuestion) -> dict[str, Any]:
    """The signed statement: the asked pairs the hub receipted to ``site`` for that study."""
    # The embedded archive keeps every version of a UID (the last one current); a DICOMweb
    # archive may keep only the last it took (Orthanc with OverwriteInstances, which
    # corrections need): there, an older version's receipt no longer says it is held.
    # ``last`` tells the site whether the region's last word on the UID is this version:
    # when not, the site sends it again (its bytes held or not) for the region to end with
    # the sender's last word.
    keeps_versions = hub.settings.archive.kind == "embedded"
    receipted = store.receipted_instances(hub.db, site, question.study_uid)
    held = []
    for asked in question.instances:
        pair = (asked.sop_instance_uid, asked.sha256)
        transfer, last = receipted.get(pair, ("", False))
        if transfer and (last or keeps_versions):
            held.append({"sop_instance_uid": pair[0], "sha256": pair[1],
                         "transfer_id": transfer, "last": last})
    statement: dict[str, Any] = {
        "statement": STATEMENT, "site": site, "study_uid": question.study_uid,
        "nonce": question.nonce, "asked": len(question.instances),
        "stated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "instances": held,
    }
    if keeps_versions:
        own = {(i["sop_instance_uid"], i["sha256"]) for i in held}
        statement["region_instances"] = region_held(hub, site, question, own)
    statement["signature"] = hub.pki.sign(statement)
    return statement


def region_held(hub: Hub, site: str, question: HoldingsQuestion,
                own: set[tuple[str, str]]) -> list[dict[str, str]]:
    """The asked pairs the embedded archive holds, with those exact bytes, that this site
    never sent: another site's study this one fetched from the region (a prior, a
    fetch-through) and adopted again after its index was rebuilt. Each pair only: no site,
    no transfer (the asker learns nothing it does not hold already: it has the bytes, and
    the region's QIDO-RS and WADO-RS serve it the study). Pairs a transfer of this site put
    in the archive (committed or not) are its own, never the region's from elsewhere: they
    are in ``instances`` or are sent. Only the embedded archive, whose index records the
    SHA-256 of each version's exact bytes: a DICOMweb PACS may hold a UID with other bytes
    than any the hub saw (overwritten, or stored by another feed), so nothing is said."""
    archive_db = getattr(hub.archive, "db", None)
    if archive_db is None:
        return []
    from appliance.store.retrieve import held_versions

    asked = [(i.sop_instance_uid, i.sha256) for i in question.instances]
    sent_by_site = store.archived_for_site(hub.db, site, question.study_uid)
    held = held_versions(archive_db, question.study_uid,
                         [p for p in asked if p not in own and p not in sent_by_site])
    return [{"sop_instance_uid": uid, "sha256": sha} for uid, sha in asked
            if (uid, sha) in held]


def holdings_routes(hub: Hub) -> list[BaseRoute]:
    limit = hub.settings.limits.max_manifest_bytes  # a question is smaller than its manifest

    async def holdings(request: Request) -> Response:
        """Which of the listed (SOP Instance UID, SHA-256) pairs of a study this site's
        committed transfers were receipted for: a statement signed like a receipt."""
        site = request.state.site
        try:
            raw = await read_body_limited(request, limit, "holdings request")
            raw = _decoded_body(raw, request.headers.get("content-encoding", ""), limit)
        except BodyTooLarge as exc:
            log.warning("site %s: %s", site, exc, extra={"SITE": site})
            return exc.response
        except OverflowError:
            return problem(413, "too_large", f"holdings request over {limit} bytes")
        except _BadEncoding as exc:
            return problem(400, "bad_encoding", str(exc))
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            log.warning("site %s: holdings request is not JSON (%s)", site, exc,
                        extra={"SITE": site})
            return problem(400, "bad_json", f"the body is not JSON: {exc}")
        try:
            question = HoldingsQuestion.model_validate(data)
        except ValidationError as exc:
            detail = _validation_detail(exc).replace("manifest:", "request:")
            log.warning("site %s: malformed holdings request: %s", site, detail,
                        extra={"SITE": site})
            return problem(422, "bad_request", detail)
        # The same UID with two SHA-256 is two versions of a corrected instance, both of
        # which the site may hold: a fair question. The same pair twice is not.
        twice = [pair for pair, n in Counter((i.sop_instance_uid, i.sha256)
                                            for i in question.instances).items() if n > 1]
        if twice:
            log.warning("site %s: holdings request lists %s twice", site, twice[0][0],
                        extra={"SITE": site})
            return problem(422, "bad_request", f"instances: SOP Instance UID {twice[0][0]} "
                           "appears twice with the same SHA-256")
        statement = await run_in_threadpool(holdings_statement, hub, site, question)
        log.info("site %s: study %s: the region holds %d of the %s asked about from this "
                 "site (%d more from elsewhere)",
                 site, question.study_uid, len(statement["instances"]),
                 counted(len(question.instances), "instance"),
                 len(statement.get("region_instances", [])),
                 extra={"SITE": site, "STUDY_UID": question.study_uid})
        return json_answer(request, statement)

    return [Route(HOLDINGS_PATH, holdings, methods=["POST"])]
