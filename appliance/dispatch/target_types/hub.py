"""Destination kind ``hub``: one resumable, sealed, compressed transfer per job (docs/protocol.md).

Owns: turning a job (a study or its delta) into a transfer: the transfer id and key, chosen
once and saved in the job's progress before the first request (so a retry, a restart or a
kill -9 resumes the *same* transfer), the deterministic bucket plan, sending only the buckets
the hub does not hold (several in flight, packed and sealed ahead of the PUTs by
``dispatch/pack_ahead.py``), the commit, the receipt's check and the
confirmation of exactly the receipt's (UID, SHA-256) pairs. The holdings question asked
before a new transfer of adopted instances is ``dispatch/hub_holdings.py``'s. May not touch:
SQL (through ``appliance.store``), the packing format or the cipher (``appliance.transfer``).

Why the raw transfer key is kept in the job's progress: buckets already held by the hub were
sealed under it, so a resumed transfer must seal the rest under the same key, and its wrapped
form must stay identical for the manifest to be "the same" (the hub answers 409 otherwise).
The key protects the data on the WAN; on the appliance's own disk the instances sit in clear
beside it, so keeping it there adds no exposure.

Memory: the manifest holds metadata only; at most ``hub.parallel_buckets + PACK_AHEAD`` sealed
buckets exist at once (and ``PACKERS`` plaintext ones being packed).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from hashlib import sha256
from typing import Any

from appliance.config import Settings
from appliance.dispatch.hub_holdings import settle_holdings
from appliance.dispatch.pack_ahead import PackAhead
from appliance.dispatch.target_types.base import (
    DestinationBusy,
    LinkDown,
    PermanentError,
    SendContext,
    TrustRefused,
)
from appliance.ops import metrics
from appliance.store import jobs as job_store
from appliance.store import uplink as uplink_store
from appliance.store.db import Database
from appliance.store.jobs import Job
from appliance.transfer.client import (
    HubBusy,
    HubClient,
    HubRefused,
    HubUnavailable,
    ReceiptInvalid,
    canonical_json,
)
from appliance.transfer.enrolment import Enrolment
from appliance.transfer.http import hub_proxy
from appliance.transfer.link_failures import (
    TRUST_HINT,
    credentials_refused,
    link_down,
    trust_problem,
)
from appliance.transfer.throttle import cap_mbps, hub_throttle
from appliance.words import counted

log = logging.getLogger("pas.dispatch.hub")

# The link state is written at most this often while it does not change (each write is an
# fsynced transaction; a transfer makes hundreds of requests).
LINK_STATE_EVERY_S = 5.0
COMMIT_ROUNDS = 3
FIRST_BUCKET_BYTES = 1 << 20
SPLIT_OVER_S = 0.5
# Sealed buckets kept ready beyond the PUTs on the wire, and the threads packing them
# (packing's JPEG-LS runs outside the GIL; two keep a 20 Mbit/s line fed on two cores).
PACK_AHEAD = 2
PACKERS = 2


def bucket_sizes(study_bytes: int, target: int,
                 line_mbps: float | None = None) -> tuple[int, int | None]:
    """The bucket size and first bucket size for a study of ``study_bytes`` (original bytes),
    given ``hub.bucket_mb`` and the line's configured rate (None: unknown). Saved in the
    job's progress with the transfer, so a resumed transfer cuts the same buckets.

    A study of more than two buckets starts with a small one: the hub archives its instances
    while the rest is on the wire (MR at 20 Mbit/s: the regional archive began ~0.5 s into the
    transfer instead of ~0.9 s). A smaller study on a slow line (its original bytes take
    over SPLIT_OVER_S at the line's rate) is cut in two halves, none under
    FIRST_BUCKET_BYTES: its two PUTs go side by side and end in smaller steps, so the PUTs of
    many small studies sharing the line leave less of it idle at the end of the queue (CT at
    20 Mbit/s, one bucket per study: the last ~0.3 s ran at 20-80 % of the line; cut, CT
    3.0-3.1x against 2.9-3.0x). Not on a fast line: each bucket costs CPU and a hub round
    of its own, and there the CPU is the limit (100 Mbit/s CT: 1.68-1.72x cut, 1.93-2.02x
    not)."""
    if study_bytes > 2 * target:
        return target, FIRST_BUCKET_BYTES
    if line_mbps and study_bytes * 8 / (line_mbps * 1e6) > SPLIT_OVER_S:
        return max(FIRST_BUCKET_BYTES, min(target, -(-study_bytes // 2))), None
    return target, None


@dataclasses.dataclass
class _Sent:
    """What sending a round of buckets came to: the hub already had the transfer committed
    (a PUT answered 409), or a PUT committed it and brought the receipt."""

    committed_elsewhere: bool = False
    receipt: dict[str, Any] | None = None


class LinkRecorder:
    """Writes the link state of one destination, skipping repeats of an unchanged state."""

    def __init__(self, db: Database, destination: str):
        self.db = db
        self.destination = destination
        self._last: tuple[bool, float] | None = None
        self._lock = threading.Lock()

    def __call__(self, ok: bool, error: str | None) -> None:
        at = time.monotonic()
        with self._lock:
            if (ok and self._last is not None and self._last[0]
                    and at - self._last[1] < LINK_STATE_EVERY_S):
                return
            self._last = (ok, at)
        uplink_store.record_contact(self.db, self.destination, ok, error)


class HubTarget:
    kind = "hub"

    def __init__(self, name: str, settings: Settings, enrolment: Enrolment, db: Database,
                 client: HubClient | None = None):
        self.name = name
        self.config = settings.hub
        self._auto_level: tuple[str, bool] | None = None
        self.enrolment = enrolment
        self.client = client or HubClient(
            enrolment.url, enrolment.ssl_context(), timeout_s=self.config.timeout_s,
            retries=self.config.retries,
            max_connections=self.config.connections,
            throttle=hub_throttle(self.config), on_contact=LinkRecorder(db, name),
            on_put_bytes=metrics.add_upload_put_bytes, on_inflight=metrics.add_upload_inflight,
            link_mbps=self.config.link_mbps, proxy=hub_proxy(self.config),
        )
        if client is None:  # the daemon's own client: its connections stay open while idle
            self.client.keep_warm()

    # --- the job ---------------------------------------------------------------------------

    def send(self, job: Job, context: SendContext) -> None:
        try:
            # The lease is renewed by time for the whole attempt, as the dicom and stowrs
            # kinds do: it was renewed only while buckets went and the commit ran, and a
            # hub that held any other answer (the holdings question, what it holds of a
            # transfer, the manifest's POST, a receipt) past queue.lease_s let a second
            # worker claim the job beside the first; over an outage of a silent hub each
            # such claim counted an attempt the first worker's wait for the link could not
            # give back, and the job ended failed. The steps check the lease between them
            # (``SendContext.still_ours``): a worker that lost it changes nothing more.
            with context.renewing(job) as lost:
                self._send(job, dataclasses.replace(context, lease_lost=lost))
        except (HubUnavailable, HubRefused) as exc:
            problem = credentials_refused(exc, self.enrolment)
            if problem is not None:
                # A certificate refused at either end: every job would meet it, none is at
                # fault. They wait, counted nowhere, until someone puts the certificate right.
                raise TrustRefused(f"{self.name}: {problem}; {TRUST_HINT}") from exc
            if isinstance(exc, HubBusy):
                # It answered, busy, naming when to come back: the job waits, uncounted.
                raise DestinationBusy(str(exc), exc.retry_after_s) from exc
            if isinstance(exc, HubUnavailable) and link_down(exc):
                # No answer at all (no connection, or it went silent): the WAN or the hub is
                # down, which says nothing about this job. It waits for the link.
                raise LinkDown(str(exc)) from exc
            raise

    def _send(self, job: Job, context: SendContext) -> None:
        from appliance.transfer import pack

        job = self._leave_out_replaced(job, context)
        rows = job_store.job_files(context.db, job.id, unsent_only=False)
        if not rows:
            return
        if all(r["sent_at"] is not None for r in rows):
            return  # confirmed by an earlier attempt that died before finishing the job
        job, rows = settle_holdings(self.client, job, context, rows)
        if not rows:
            return  # the region holds every instance already: no transfer at all
        context.still_ours(job)
        items = [pack.PackItem(r["sop_instance_uid"], context.spool.path(r["path"]),
                               int(r["size"]), r["sha256"]) for r in rows]
        new_transfer = not job.progress.get("transfer_id")
        # A resumed transfer cuts as when it was created: the sizes it saved then (a transfer
        # from before they were saved: as then, regardless of the line).
        saved = job.progress.get("bucket_sizes")
        target, first = (saved if saved and not new_transfer else
                         bucket_sizes(sum(i.size for i in items),
                                      int(self.config.bucket_mb * 1024 * 1024),
                                      self._line_mbps() if new_transfer else None))
        plans = pack.plan_buckets(items, target, first)
        progress = self._transfer_identity(job, context, len(plans), [target, first])
        transfer_id = progress["transfer_id"]
        key = base64.b64decode(progress["key"])
        manifest = self._manifest(job, rows, plans, transfer_id, progress["wrapped_key"])
        extra = {"JOB_ID": job.id, "STUDY_UID": job.study_uid, "TRANSFER_ID": transfer_id}
        # A new transfer's manifest and first buckets go at once (the hub holds a bucket that
        # comes first until its manifest is in, docs/protocol.md): one round trip less per
        # study, 70 ms on a regional line. A resumed transfer asks first what the hub holds.
        with ThreadPoolExecutor(2, thread_name_prefix=f"pas-hub-{job.id}-first") as early:
            # Held only in this dict, which the first round of PUTs takes it out of (a future
            # keeps its sealed bucket for as long as anything refers to it).
            prepacked = ({plans[0].index: early.submit(self._pack, plans[0], key, transfer_id)}
                         if new_transfer else {})
            first_held: set[int] | None = None
            if new_transfer:
                creating: Future[bool] | None = early.submit(self._create, job, context,
                                                             progress, manifest)
                created = True  # a new id: the hub cannot hold any of its buckets
            else:
                creating = None
                created, first_held = self._create_unless_held(job, context, progress,
                                                               manifest, extra)
            receipt = self._deliver(job, context, progress, key, plans, created, prepacked,
                                    extra, creating, first_held)
        self._confirm(job, context, rows, receipt, transfer_id)
        # Delivered: the transfer key has no further use; keep only the id and the counters.
        context.still_ours(job)
        self._save(job, context, {
            k: v for k, v in progress.items() if k not in ("key", "wrapped_key")})

    def _create(self, job: Job, context: SendContext, progress: dict[str, Any],
                manifest: dict[str, Any]) -> bool:
        """POST the manifest: True if the hub created the transfer now (it holds nothing)."""
        try:
            return self.client.create_transfer(manifest) == 201
        except HubRefused as exc:
            if trust_problem(exc) is not None:
                raise  # not this manifest's fault: send() makes the job wait
            if exc.status == 409:  # our id with another manifest: the job changed
                context.still_ours(job)
                self._forget_transfer(job, context, progress)
                raise RuntimeError(f"{exc}; a new transfer will be created") from None
            raise PermanentError(str(exc)) from None

    def _create_unless_held(self, job: Job, context: SendContext, progress: dict[str, Any],
                            manifest: dict[str, Any], extra: dict[str, Any]
                            ) -> tuple[bool, set[int] | None]:
        """A resumed transfer: the hub asked first what it holds of it. When it holds this
        very manifest (the SHA-256 of its canonical JSON, which the hub keeps), the manifest
        is not sent again: every retry round of a 50,000-instance study re-posted megabytes
        on a slow line. Otherwise (the hub does not know the transfer: expired, or restored
        from a backup older than it; it holds another manifest; it is too old to say), the
        POST as for a new one. Returns (created now, the buckets the hub holds if asked)."""
        known = self.client.transfer_held(progress["transfer_id"])
        context.still_ours(job)
        if known is not None and known[1] == sha256(canonical_json(manifest)).hexdigest():
            log.info("transfer %s: the hub holds its manifest already: not sent again",
                     progress["transfer_id"], extra=extra)
            return False, known[0]
        return self._create(job, context, progress, manifest), None

    def _deliver(self, job: Job, context: SendContext, progress: dict[str, Any], key: bytes,
                 plans: list[Any], created: bool, prepacked: dict[int, Future[Any]],
                 extra: dict[str, Any], creating: Future[bool] | None = None,
                 first_held: set[int] | None = None) -> dict[str, Any]:
        """Send what the hub lacks and commit, up to COMMIT_ROUNDS times; the receipt.
        ``prepacked``: buckets packed early, used (and taken out) by the first round only.
        ``creating``: the manifest's POST under way while the first round's PUTs go; its
        refusal, if any, is what the attempt fails with (it says more than a bucket's 404).
        ``first_held``: what the hub said it holds just before (not asked again)."""
        transfer_id = progress["transfer_id"]
        receipt: dict[str, Any] | None = None
        for _round in range(COMMIT_ROUNDS):
            context.still_ours(job)
            # 201: the hub has just created this transfer and holds none of its buckets; not
            # asking saves one round trip per transfer (70 ms each on a regional line).
            fresh = _round == 0 and created
            if fresh:
                held: set[int] = set()
            elif _round == 0 and first_held is not None:
                held = first_held
            else:
                held = self.client.held_buckets(transfer_id) or set()
                context.still_ours(job)
            missing = [p for p in plans if p.index not in held]
            log.info("transfer %s: %s, hub holds %d, sending %d", transfer_id,
                     counted(len(plans), "bucket"), len(held), len(missing), extra=extra)
            if _round > 0 or not missing or missing[0].index not in prepacked:
                prepacked.clear()  # the hub holds it already, or a later round: not needed
            try:
                sent = (self._send_buckets(job, context, progress, key, missing, prepacked)
                        if missing else _Sent())
            finally:
                if creating is not None:  # raises the manifest's refusal, if any
                    pending, creating = creating, None
                    pending.result()
            context.still_ours(job)
            if sent.committed_elsewhere:
                receipt = self.client.receipt(transfer_id)  # 409 on PUT: already committed
                if receipt is None:
                    raise RuntimeError(f"transfer {transfer_id}: hub says committed, no receipt")
                break
            if sent.receipt is not None:  # the last PUT committed (one round trip saved)
                receipt = sent.receipt
                break
            # The hub rebuilds and archives the whole study before answering (the lease is
            # renewed meanwhile: send()). Not committed by a worker that lost the job.
            context.still_ours(job, ask=True)
            response = self.client.commit(transfer_id)
            context.still_ours(job)
            if response.status_code == 200:
                receipt = response.json()
                break
            body = response.json() if response.content else {}
            if response.status_code == 422:
                raise self._cannot_rebuild(job, context, progress, plans, body)
            log.warning("transfer %s: commit says buckets missing %s", transfer_id,
                        body.get("missing"), extra=extra)
        if receipt is None:
            raise RuntimeError(f"transfer {transfer_id}: buckets still missing after "
                               f"{COMMIT_ROUNDS} rounds")
        return receipt

    def _cannot_rebuild(self, job: Job, context: SendContext, progress: dict[str, Any],
                        plans: list[Any], body: dict[str, Any]) -> Exception:
        """For a commit refused 422 (the hub cannot rebuild the transfer from the buckets it
        holds, and keeps the first copy of each): the job leaves the transfer, its next
        attempt sends a new one (kept, every retry met the same 422, cause gone or not).
        Files here damaged: fail for good naming them; intact: spoiled on the way, retried."""
        from appliance.transfer import pack

        context.still_ours(job)
        self._forget_transfer(job, context, progress)
        error, transfer_id = body.get("error", "unprocessable"), progress["transfer_id"]
        if error == "another_site":  # not a rebuild problem: the region refuses these UIDs
            uids = sorted(str(e.get("sop_instance_uid")) for e in body.get("another_site") or []
                          if isinstance(e, dict))
            count = counted(len(uids), "instance") if uids else "some instances"
            return PermanentError(
                f"the region refuses {count} of study {job.study_uid}: another site already "
                "archived those SOP Instance UIDs with other bytes (a study imported with its "
                "UIDs kept and its contents changed, or a modality reusing UIDs), and the "
                "region keeps that site's images; this study stays here, unconfirmed (never "
                "evicted): contact regional ops, giving the study and these UIDs: "
                f"{', '.join(uids[:5]) or body.get('detail')}"
                + (f" and {len(uids) - 5} more" if len(uids) > 5 else ""))
        named = {str(m.get("sop_instance_uid")) for m in body.get("mismatch") or []
                 if isinstance(m, dict)}
        items = {item.sop_instance_uid: item for plan in plans for item, _o, _l in plan.entries}
        damaged = pack.damaged([items[uid] for uid in sorted(named) if uid in items])
        if damaged:
            files = "; ".join(f"{i.sop_instance_uid} ({i.path})" for i in damaged[:3])
            return PermanentError(
                f"the hub cannot rebuild transfer {transfer_id} ({error}): the file here of "
                f"{counted(len(damaged), 'instance')} is damaged (not the SHA-256 recorded "
                f"when received): {files}; once the sender sent it again, `pas queue retry "
                f"{job.id}` sends a new transfer")
        if error == "superseded":
            return RuntimeError(
                f"the hub refused transfer {transfer_id}: {body.get('detail')}; the next "
                "attempt sends a new transfer, without the versions replaced since")
        if error == "sha256_mismatch" and named:
            return RuntimeError(
                f"the hub rebuilt {counted(len(named), 'instance')} of transfer {transfer_id} "
                f"with another SHA-256 while the files here are intact (spoiled on the way): "
                f"{', '.join(sorted(named)[:3])}; the next attempt sends a new transfer")
        return PermanentError(f"the hub cannot rebuild transfer {transfer_id} ({error}): "
                              f"{body.get('detail')}; `pas queue retry {job.id}` sends a new "
                              "transfer")

    def _transfer_identity(self, job: Job, context: SendContext, bucket_count: int,
                           sizes: list[int | None]) -> dict[str, Any]:
        """The job's transfer id and key: created once, saved before any request."""
        from appliance.transfer import seal

        progress = dict(job.progress)
        if progress.get("transfer_id") and progress.get("key") and progress.get("wrapped_key"):
            return progress
        transfer_id = str(uuid.uuid4())
        key = seal.new_transfer_key()
        wrapped = seal.wrap_key(key, self.enrolment.hub_transfer_key, transfer_id)
        progress.update(transfer_id=transfer_id, key=base64.b64encode(key).decode(),
                        wrapped_key=base64.b64encode(wrapped).decode(),
                        bucket_count=bucket_count, bucket_sizes=sizes, buckets_sent=0, bytes_sent=0,
                        original_bytes_sent=0)
        self._save(job, context, progress)
        return progress

    def _leave_out_replaced(self, job: Job, context: SendContext) -> Job:
        """At each attempt's start, the job's versions replaced since it was routed (a
        correction: the same UID, other bytes) that would now arrive after their correction
        go out of it (:func:`job_store.drop_replaced_versions`): sent, the stale version was
        the region's newer one (a failed job retried after the correction went up). A
        transfer begun with them is left for a new one: its manifest is fixed (the hub's own
        check refuses a version a later receipt of the study replaced, but only for transfers
        it saw begin before that receipt's; a retried job's may begin after)."""
        replaced = job_store.drop_replaced_versions(
            context.db, job.id, new_transfer=not job.progress.get("transfer_id"))
        if not replaced:
            return job
        left = job.progress.get("transfer_id")
        log.warning("job %d: %s replaced since it was routed (a correction: the same UID, other "
                    "bytes) left out%s: %s", job.id, counted(len(replaced), "instance"),
                    f", and its transfer {left} for a new one" if left else "",
                    ", ".join(replaced[:3]), extra={"JOB_ID": job.id, "STUDY_UID": job.study_uid})
        if not left:
            return job
        return dataclasses.replace(job, progress=self._forget_transfer(
            job, context, dict(job.progress)))

    @staticmethod
    def _save(job: Job, context: SendContext, progress: dict[str, Any]) -> None:
        """The job's progress saved while this worker holds its lease, or the attempt stops:
        another worker took the job (its progress is that worker's to write)."""
        if not job_store.save_progress(context.db, job.id, progress, owner=context.owner):
            raise RuntimeError(f"job {job.id}: lease lost, another worker owns it now")

    def _forget_transfer(self, job: Job, context: SendContext,
                         progress: dict[str, Any]) -> dict[str, Any]:
        """The job's progress saved without its transfer: the next attempt makes a new one."""
        kept = {k: v for k, v in progress.items() if k not in ("transfer_id", "key", "wrapped_key")}
        self._save(job, context, kept)
        return kept

    def _manifest(self, job: Job, rows: list[Any], plans: list[Any], transfer_id: str,
                  wrapped_key: str) -> dict[str, Any]:
        where: dict[str, list[int]] = {}
        for plan in plans:
            for item, _offset, _length in plan.entries:
                indexes = where.setdefault(item.sop_instance_uid, [])
                if not indexes or indexes[-1] != plan.index:
                    indexes.append(plan.index)
        return {
            "transfer_id": transfer_id, "study_uid": job.study_uid, "priority": job.priority,
            "wrapped_key": wrapped_key, "bucket_count": len(plans),
            "instances": [
                {"sop_instance_uid": r["sop_instance_uid"], "sop_class_uid": r["sop_class_uid"],
                 "size": int(r["size"]), "sha256": r["sha256"],
                 "buckets": where.get(r["sop_instance_uid"], [])}
                for r in rows
            ],
        }

    # --- buckets ---------------------------------------------------------------------------

    def _line_mbps(self) -> float | None:
        """The line's rate from the configuration (the cap in force, ``hub.link_mbps``), or
        None: what cuts a study's buckets (not the measured rate, which moves)."""
        known = [rate for rate in (cap_mbps(self.config), self.config.link_mbps) if rate > 0]
        return min(known) if known else None

    def _pack_level(self) -> str:
        """The configured level, or for ``auto`` the one that delivers most on this link: the
        link rate is the least of the cap in force, the line's configured rate
        (``hub.link_mbps``) and what the PUTs measured; with none known yet, ``default``. So on
        a fast line with busy cores packing gets lighter.

        Not the pace-based inference of ``levels`` (a worker's time between two buckets as
        its share of the link): packers run ahead of the PUTs, so that time is not sending."""
        from appliance.transfer import levels

        if self.config.pack_level != "auto":
            return self.config.pack_level
        cap = cap_mbps(self.config)
        measured = self.client.meter.mbps()
        known = [rate for rate in (cap if cap > 0 else None, self.config.link_mbps or None,
                                   measured) if rate]
        link = min(known) if known else None
        levels.set_link_mbps(link)
        level = levels.choose_level(link) if link else "default"
        if (level, link is None) != self._auto_level:  # once per change: the choice and why
            self._auto_level = (level, link is None)
            log.info("pack_level auto: %s (link %s, cap %s Mbit/s, measured %s)", level,
                     f"{link:.1f} Mbit/s" if link else "unknown", cap or "none",
                     f"{measured:.1f} Mbit/s" if measured else "not yet")
        return level

    def _pack(self, plan: Any, key: bytes, transfer_id: str) -> tuple[bytes, int, str]:
        """One bucket packed at the level in force and sealed: (sealed, original bytes,
        level)."""
        from appliance.transfer import pack, seal

        level = self._pack_level()
        payload, stats = pack.pack_bucket(plan, level)
        sealed = seal.seal_bucket(key, transfer_id, plan.index, payload)
        return sealed, int(stats.get("original", 0)), level

    def _send_buckets(self, job: Job, context: SendContext, progress: dict[str, Any],
                      key: bytes, plans: list[Any],
                      prepacked: dict[int, Future[tuple[bytes, int, str]]] | None = None,
                      ) -> _Sent:
        """Pack, seal and PUT ``plans``: ``parallel_buckets`` PUTs at a time, fed by packers
        that keep up to ``PACK_AHEAD`` sealed buckets ready (the lease is renewed by
        ``send()``; a lost one stops the sending, and no progress is saved after it).
        Every PUT asks the hub to commit if it completes the set, so the last one usually
        brings the receipt back. ``prepacked``: buckets already being packed (by index).

        Why packing runs ahead of the PUTs: when each PUT thread packed its own next bucket,
        PUTs that shared the line finished together and then all packed at once, leaving the
        line idle in waves (MR at 20 Mbit/s: ~0.2 s gaps every ~0.4 s). Packers fill a bounded
        window of sealed buckets in plan order; a PUT thread takes the next one as soon as it
        is free. Memory: at most ``parallel_buckets + PACK_AHEAD`` sealed buckets exist (one
        more while a new transfer's first bucket is packed early)."""
        transfer_id = progress["transfer_id"]
        lock = threading.Lock()
        urgent = job.priority == 0
        outcome = _Sent()

        def pack_one(plan: Any) -> tuple[bytes, int, str]:
            return self._pack(plan, key, transfer_id)

        def put_one(plan: Any, packed: tuple[bytes, int, str]) -> tuple[int, int, str]:
            sealed, original, level = packed
            answer = self.client.put_bucket(transfer_id, plan.index, sealed, urgent=urgent,
                                            commit=True)
            if answer.receipt is not None:
                outcome.receipt = answer.receipt
            return len(sealed), original, level

        check_every = max(0.1, context.lease_s / 3)
        first_error: BaseException | None = None
        throttle = self.client.throttle
        with contextlib.ExitStack() as stack:
            if urgent and throttle is not None:
                stack.enter_context(throttle.urgent())
            ahead = stack.enter_context(PackAhead(
                pack_one, put_one, senders=self.config.parallel_buckets, ahead=PACK_AHEAD,
                packers=min(PACKERS, len(plans)), name=f"pas-hub-{job.id}"))
            failed = ahead.failed
            pending = ahead.submit_all(plans, prepacked)
            while pending:
                done, pending = wait(pending, timeout=check_every, return_when=FIRST_COMPLETED)
                context.still_ours(job)
                for future in done:
                    error = future.exception()
                    if error is None:
                        wire, original, level = future.result()
                        with lock:
                            chosen = progress.setdefault("pack_levels", {})
                            chosen[level] = chosen.get(level, 0) + 1
                            progress["buckets_sent"] = progress.get("buckets_sent", 0) + 1
                            progress["bytes_sent"] = progress.get("bytes_sent", 0) + wire
                            progress["original_bytes_sent"] = (
                                progress.get("original_bytes_sent", 0) + original)
                            self._save(job, context, progress)
                    elif isinstance(error, HubRefused) and error.status == 409:
                        outcome.committed_elsewhere = True
                        failed.set()
                    elif first_error is None:
                        first_error = error
                        failed.set()
        if outcome.committed_elsewhere:
            return outcome
        if first_error is not None:
            if isinstance(first_error, HubRefused) and first_error.status in (413, 416):
                raise PermanentError(str(first_error)) from first_error
            if isinstance(first_error, HubUnavailable | HubRefused):
                raise first_error
            raise RuntimeError(f"bucket failed: {type(first_error).__name__}: "
                               f"{first_error}") from first_error
        context.still_ours(job)
        return outcome

    # --- receipt ---------------------------------------------------------------------------

    def _confirm(self, job: Job, context: SendContext, rows: list[Any],
                 receipt: dict[str, Any], transfer_id: str) -> None:
        """Verify the receipt, confirm exactly its (UID, SHA-256) pairs, mark those sent."""
        context.still_ours(job, ask=True)
        try:
            self.client.verify(receipt)
        except ReceiptInvalid as exc:
            raise RuntimeError(f"transfer {transfer_id}: {exc}") from None
        if receipt.get("transfer_id") != transfer_id:
            raise RuntimeError(f"receipt is for transfer {receipt.get('transfer_id')}, "
                               f"not {transfer_id}")
        pairs = {(str(i["sop_instance_uid"]), str(i["sha256"]))
                 for i in receipt.get("instances", [])}
        confirmed = job_store.confirm_instances(context.db, sorted(pairs))
        covered = [r["id"] for r in rows if (r["sop_instance_uid"], r["sha256"]) in pairs]
        context.mark_sent(job, covered)
        log.info("transfer %s: receipt for %s (%d newly confirmed)", transfer_id,
                 counted(len(pairs), "instance"), confirmed,
                 extra={"JOB_ID": job.id, "STUDY_UID": job.study_uid})
        absent = [r["sop_instance_uid"] for r in rows
                  if (r["sop_instance_uid"], r["sha256"]) not in pairs]
        if absent:
            raise PermanentError(f"receipt of transfer {transfer_id} does not name "
                                 f"{counted(len(absent), 'instance')}, e.g. {absent[:3]}")
