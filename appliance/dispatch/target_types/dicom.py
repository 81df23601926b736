"""Destination kind ``dicom``: C-STORE to a DICOM node on the LAN (the hospital's own PACS).

One association per job (a study or its delta); a study with so many SOP classes that its
presentation contexts exceed the 128 an association may carry is sent over several, one after
the other. Each SOP class is proposed in every transfer syntax it is stored in, each alone in
its own context (so a peer that supports it cannot pick another), and once more as
Explicit VR Little Endian + Implicit VR Little Endian: the fallback, since Implicit VR Little
Endian is the one syntax every DICOM node must accept.

A stored file goes byte for byte, streamed from disk, whenever its own syntax was accepted
(bit-exact is the rule). Only when it was not is the instance re-encoded in whichever of the
two little endian syntaxes the peer accepted (explicit first), into a spool temp file
(``appliance.store.transcode``: decompressed a frame at a time, or byte-swapped from Explicit
VR Big Endian; same SOP Instance UID), sent from that file straight to the socket
(``appliance.dicomnet.direct_store``, pynetdicom's path without the event-driven reactors) and
removed once sent, or not. It was decoded whole in memory: +1.2 GB for a 300 MB object.

A SOP class for which the peer accepted no usable context is a permanent error that names the
SOP class, the syntaxes proposed and the peer's answer; the job's other instances are sent
first (a retry after the peer is reconfigured resumes with the rest).

A peer that could not be reached at all (no TCP connection: refused, timed out, no route)
before anything was delivered in this attempt raises ``LinkDown``: a PACS down for a
weekend's maintenance makes the jobs wait for it, uncounted, instead of failing every study
after ``queue.max_attempts``. pynetdicom reports a failed connection exactly like an
A-ABORT (``is_aborted``, nothing negotiated), so the connection's opening is watched
(``EVT_CONN_OPEN``) to tell them apart. A peer that answered (an association rejected, an
abort once connected, a C-STORE failure status, a connection lost mid-study once something
went) is an ordinary failed attempt: it says something about the peer, and what it
acknowledged is kept by ``mark_sent``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS

from appliance.config import DicomDestination
from appliance.dicomnet.direct_store import DirectStoreError, DirectStoreSender
from appliance.dicomnet.rejection import RejectionWatch
from appliance.dispatch.target_types.base import (
    LinkDown,
    NoRoomForCopy,
    PermanentError,
    SendContext,
    TrustRefused,
)
from appliance.store import uplink as uplink_store
from appliance.store.jobs import Job
from appliance.store.spool import SpoolFull
from appliance.store.transcode import TranscodeError, transcoded
from appliance.words import counted

log = logging.getLogger("pas.dispatch.dicom")

# Send files' datasets exactly as stored, streamed from disk, instead of decoding them.
_config.STORE_SEND_CHUNKED_DATASET = True

UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts in one association
# Progress (the instances the node acknowledged) is recorded every BATCH_MARK instances, or
# once MARK_EVERY_S passed since the last record, whichever comes first: a daemon killed
# mid-study re-sends what it had not recorded. By count alone, a node taking a second per
# C-STORE (or large instances) got up to 24 instances again after a kill -9 (measured: 4 of
# 4 acknowledged re-sent); now what the last half second acknowledged, at most two small
# transactions a second.
BATCH_MARK = 25
MARK_EVERY_S = 0.5
# Stored: Success and every Warning as pynetdicom classifies a C-STORE status (PS3.4 B.2.3's
# 0xB000, 0xB006, 0xB007 and PS3.7 C's general 0x0107, 0x0116), as the retrieve's audit
# counts them (serving/suboperations.py). The general warnings were taken for failures: the
# instance, stored by the node, sent again at each attempt and the job failed in the end.
STORED = (STATUS_SUCCESS, STATUS_WARNING)


def stored(status: int) -> bool:
    """Whether the node stored the instance it answered ``status`` for."""
    return STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))[0] in STORED
# Refusals in a row after which the peer refuses everything (full, broken), not one instance:
# the attempt stops there rather than offer it the rest of the study.
REFUSALS_IN_A_ROW = 10


def plan_associations(pairs: set[tuple[str, str]]) -> list[list[PresentationContext]]:
    """The presentation contexts to propose for these (SOP class, stored syntax) pairs.

    Per SOP class: each stored syntax alone, then the little endian pair (explicit first),
    no context twice. SOP classes are kept whole and grouped into as few associations of at
    most :data:`MAX_CONTEXTS` contexts as the order allows."""
    syntaxes: dict[str, list[str]] = defaultdict(list)
    for sop_class, syntax in sorted(pairs):
        syntaxes[sop_class].append(syntax)
    groups: list[list[PresentationContext]] = [[]]
    for sop_class, stored in syntaxes.items():
        proposals = [[s] for s in stored] + [list(UNCOMPRESSED)]
        needed = [build_context(sop_class, p) for p in proposals]
        if groups[-1] and len(groups[-1]) + len(needed) > MAX_CONTEXTS:
            groups.append([])
        groups[-1].extend(needed)
    return [g for g in groups if g]


@dataclass
class _Attempt:
    """What one attempt met so far: whether a TCP connection to the peer ever opened (then
    the peer was reachable, whatever else happens in this attempt), the instances whose
    stored file could not be read, and those that could not be re-encoded in a syntax the
    peer accepted (SOP Instance UID, the error): passed over, not sent."""
    reached: bool = False
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    not_reencoded: list[tuple[str, str]] = field(default_factory=list)


class _NotReencoded(Exception):
    """This instance cannot be re-encoded in the syntax the peer accepted (its stored pixel
    data does not decode): the instance is passed over, not the association."""


@dataclass
class _Refused:
    """Instances of one SOP class the peer accepted no usable context for."""
    proposed: set[str] = field(default_factory=set)
    answers: set[str] = field(default_factory=set)
    instances: int = 0


class DicomTarget:
    kind = "dicom"

    def __init__(self, name: str, config: DicomDestination, local_ae_title: str):
        self.name = name
        self.config = config
        self.calling_ae = config.calling_ae_title or local_ae_title

    @property
    def peer(self) -> str:
        return f"{self.config.ae_title}@{self.config.host}:{self.config.port}"

    def send(self, job: Job, context: SendContext) -> None:
        files = context.files(job)
        if not files:
            return
        refused: dict[str, _Refused] = defaultdict(_Refused)
        failed: list[tuple[str, int]] = []  # (SOP Instance UID, status) the peer refused
        attempt = _Attempt()
        # The lease is renewed by time, not every N instances: N instances to a slow node
        # (or one large one) outlasted it, and a second worker sent the same study again.
        with context.renewing(job) as lease_lost:
            for contexts in plan_associations(
                    {(f["sop_class_uid"], f["transfer_syntax_uid"]) for f in files}):
                classes = {str(c.abstract_syntax) for c in contexts}
                self._send_group(job, context, contexts,
                                 [f for f in files if f["sop_class_uid"] in classes], refused,
                                 failed, lease_lost, attempt)
        unreadable = self._unreadable(attempt.unreadable, len(files))
        if refused or attempt.not_reencoded:
            # No retry cures these (the peer's configuration, or stored data that does not
            # decode): the job fails at once naming them, the rest of the study delivered.
            missed = (sum(r.instances for r in refused.values()) + len(failed)
                      + len(attempt.unreadable) + len(attempt.not_reencoded))
            raise PermanentError("; ".join(
                ([self._refusal(refused)] if refused else [])
                + ([self._not_reencoded(attempt.not_reencoded, len(files))]
                   if attempt.not_reencoded else [])
                + ([self._failures(failed, len(files))] if failed else [])
                + ([unreadable] if unreadable else []))
                + ("; the others were delivered"
                   if attempt.not_reencoded and missed < len(files) else ""))
        if failed or unreadable:
            # Retried with backoff (the peer may be out of space, the file put back by
            # pas verify --repair): only these go again.
            missed = len(failed) + len(attempt.unreadable)
            raise RuntimeError("; ".join(
                ([self._failures(failed, len(files))] if failed else [])
                + ([unreadable] if unreadable else []))
                + ("; the others were delivered" if missed < len(files) else ""))

    def _send_group(self, job: Job, context: SendContext, contexts: list[PresentationContext],
                    files: list[Any], refused: dict[str, _Refused],
                    failed: list[tuple[str, int]], lease_lost: threading.Event,
                    attempt: _Attempt) -> None:
        opened = threading.Event()
        rejection = RejectionWatch()
        assoc = self._associate(contexts, opened, rejection)
        if opened.is_set():
            attempt.reached = True
        if not assoc.is_established:
            if not opened.is_set():
                causes = ("refused, timed out, no route or the TLS handshake failed"
                          if self.config.tls else "refused, timed out or no route")
                message = f"{self.name} unreachable: no connection to {self.peer} ({causes})"
                refusal = self._tls_refusal() if self.config.tls else None
                if refusal is not None:
                    certificate, what = refusal
                    message = f"{self.name} unreachable: no association with {self.peer}: {what}"
                    if certificate:  # no retry cures it: the jobs wait for credentials
                        uplink_store.record_contact(context.db, self.name, False, message)
                        raise TrustRefused(f"{self.name}: {what}")
                uplink_store.record_contact(context.db, self.name, False, message)
                if not attempt.reached:
                    # Nothing answered in this attempt: the outage says nothing about the job.
                    raise LinkDown(message)
                raise ConnectionError(f"{message}, after it answered earlier in this attempt")
            if assoc.is_aborted and not assoc.accepted_contexts and assoc.rejected_contexts:
                # The peer answered, but accepted none of the contexts: not a network fault.
                self._note_refused(files, contexts, assoc.rejected_contexts, refused)
                return
            if rejection.reason is not None:
                how = f"rejected by the peer: {rejection.reason}"
            else:
                how = "rejected by the peer" if assoc.is_rejected else "aborted"
            message = f"{self.name}: association with {self.peer} not established ({how})"
            uplink_store.record_contact(context.db, self.name, False, message)
            raise ConnectionError(message)
        uplink_store.record_contact(context.db, self.name, True)
        sent: list[int] = []
        marked_at = time.monotonic()
        in_a_row = 0
        try:
            accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0]))
                        for c in assoc.accepted_contexts}
            usable = [f for f in files if self._usable(f, accepted)]
            self._note_refused([f for f in files if not self._usable(f, accepted)], contexts,
                               assoc.rejected_contexts, refused)
            for row in usable:
                if lease_lost.is_set():
                    raise RuntimeError(f"job {job.id}: lease lost, another worker owns it now")
                if context.left_out(job, [row]):
                    # A correction filed since the attempt began replaced it: the node
                    # never gets the version the sender replaced (a slow node's attempt
                    # lasts minutes).
                    continue
                problem = self._unreadable_file(context, row)
                if problem is not None:
                    # The appliance's own disk, not the node: the rest of the study goes.
                    attempt.unreadable.append((row["sop_instance_uid"], problem))
                    continue
                try:
                    code = self._send_one(assoc, row, accepted, context)
                except _NotReencoded as exc:
                    # Its stored data, not the node: the rest of the study goes. It raised
                    # out of the attempt: every attempt stopped at this instance, and the
                    # instances after it never reached the node.
                    attempt.not_reencoded.append((row["sop_instance_uid"], str(exc)))
                    continue
                if not stored(code):
                    # One instance refused does not hold back the rest of the study.
                    failed.append((row["sop_instance_uid"], code))
                    in_a_row += 1
                    if in_a_row >= REFUSALS_IN_A_ROW:
                        raise RuntimeError(f"{self._failures(failed, len(files))}; "
                                           f"stopped after {in_a_row} refusals in a row, the "
                                           "rest is sent at the next attempt")
                    continue
                in_a_row = 0
                if code != 0x0000:  # stored, but the node says it changed or doubted something
                    warning = STORAGE_SERVICE_CLASS_STATUS[code][1]
                    log.warning("%s stored by %s with a C-STORE warning 0x%04X (%s)",
                                row["sop_instance_uid"], self.name, code, warning,
                                extra={"JOB_ID": job.id, "STUDY_UID": job.study_uid})
                sent.append(row["id"])
                if len(sent) >= BATCH_MARK or time.monotonic() - marked_at >= MARK_EVERY_S:
                    context.mark_sent(job, sent)
                    sent, marked_at = [], time.monotonic()
        finally:
            if sent:
                context.mark_sent(job, sent)
            if assoc.is_established:
                assoc.release()

    def _tls_refusal(self) -> tuple[bool, str] | None:
        """What the TLS handshake says, for a TLS node whose association did not open
        (:func:`appliance.ops.security.tls_handshake_refusal`); None in clear."""
        from appliance.ops.security import destination_tls_args, tls_handshake_refusal

        tls_args = destination_tls_args(self.config)
        if tls_args is None:
            return None
        return tls_handshake_refusal(tls_args, self.config.host, self.config.port,
                                     self.config.timeout_s)

    def _associate(self, contexts: list[PresentationContext], opened: threading.Event,
                   rejection: RejectionWatch) -> Any:
        """Request the association; ``opened`` is set once the TCP connection is open (a
        connection that fails looks like an abort otherwise), ``rejection`` holds a
        rejection's reason (a mistyped AE title says so). The connection too is bounded
        by ``timeout_s``: pynetdicom's default waits for the system's SYN retries, about
        two minutes for a host that is off."""
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.config.timeout_s
        ae.connection_timeout = self.config.timeout_s
        tls_args = None
        if self.config.tls and self.config.tls_ca:  # DICOM TLS, BCP 195 (ops/security.py)
            from appliance.ops.security import (
                SecretFileError,
                check_secret_file,
                destination_tls_args,
            )

            if self.config.tls_cert is not None and self.config.tls_key is not None:
                # A key others can read is a setting to put right: the jobs wait for it, as
                # a stowrs destination's do. It raised a generic error: each job counted an
                # attempt, backed off and failed in the end, for a file mode.
                try:
                    check_secret_file(self.config.tls_key, f"destinations.{self.name}.tls_key")
                except SecretFileError as exc:
                    raise TrustRefused(str(exc)) from None
            tls_args = destination_tls_args(self.config)
        return ae.associate(self.config.host, self.config.port, contexts,
                            ae_title=self.config.ae_title, tls_args=tls_args,  # type: ignore[arg-type]
                            evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: opened.set()),
                                          rejection.handler()])

    @staticmethod
    def _usable(row: Any, accepted: set[tuple[str, str]]) -> bool:
        sop_class = row["sop_class_uid"]
        return (sop_class, row["transfer_syntax_uid"]) in accepted or any(
            (sop_class, ts) in accepted for ts in UNCOMPRESSED)

    @staticmethod
    def _note_refused(files: list[Any], contexts: list[PresentationContext],
                      rejected: list[PresentationContext],
                      refused: dict[str, _Refused]) -> None:
        for row in files:
            sop_class = row["sop_class_uid"]
            entry = refused[sop_class]
            entry.instances += 1
            for cx in contexts:
                if str(cx.abstract_syntax) == sop_class:
                    entry.proposed.update(str(ts) for ts in cx.transfer_syntax)
            entry.answers.update(cx.status for cx in rejected
                                 if str(cx.abstract_syntax) == sop_class)

    def _refusal(self, refused: dict[str, _Refused]) -> str:
        parts = []
        for sop_class, entry in sorted(refused.items()):
            syntaxes = ", ".join(sorted(UID(ts).name for ts in entry.proposed))
            answer = ", ".join(sorted(entry.answers)) or "no usable context"
            # A private class has no name: its UID alone, not twice.
            name = UID(sop_class).name
            named = sop_class if name == sop_class else f"{name} ({sop_class})"
            parts.append(f"SOP class {named}, proposed in "
                         f"{syntaxes} (answer: {answer}); {counted(entry.instances, 'instance')} "
                         "not sent")
        return (f"{self.name}: {self.peer} accepted no presentation context for "
                + "; ".join(parts))

    def _send_one(self, assoc: Any, row: Any, accepted: set[tuple[str, str]],
                  context: SendContext) -> int:
        """C-STORE one instance; its status. No answer at all (the association is gone)
        raises ConnectionError."""
        path = context.spool.path(row["path"])
        sop_class = row["sop_class_uid"]
        if (sop_class, row["transfer_syntax_uid"]) in accepted:
            status = assoc.send_c_store(path)  # the stored bytes, unchanged
        else:
            # _usable() kept only instances with one of the two accepted.
            target = next(ts for ts in UNCOMPRESSED if (sop_class, ts) in accepted)
            try:
                with transcoded(context.spool, path, target) as copy:
                    status = self._send_copy(assoc, copy, row)
            except SpoolFull as exc:  # the appliance's disk, not the job: wait, uncounted
                raise NoRoomForCopy(f"{self.name}: {row['sop_instance_uid']} needs a copy in "
                                    f"{UID(target).name}: {exc}") from exc
            except TranscodeError as exc:  # raised making the copy: nothing went yet
                raise _NotReencoded(" ".join(str(exc).split())) from exc
        if status is None or "Status" not in status:
            raise ConnectionError(f"{self.name}: no C-STORE response for {row['sop_instance_uid']}")
        return int(status.Status)

    def _send_copy(self, assoc: Any, path: Path, row: Any) -> Any:
        """C-STORE a transcoded copy from its file: straight to the socket when the reactors
        allow it (pynetdicom queues the whole file for its DUL when the peer reads more slowly
        than the disk), else through pynetdicom; the C-STORE-RSP's status as a dataset."""
        if DirectStoreSender.available(assoc):
            try:
                result = DirectStoreSender(assoc).send_file(
                    path, row["sop_class_uid"], row["sop_instance_uid"], message_id=1)
            except DirectStoreError as exc:  # the association is aborted
                raise ConnectionError(f"{self.name}: C-STORE of {row['sop_instance_uid']} "
                                      f"to {self.peer} failed: {exc}") from exc
            if result is not None:
                status = Dataset()
                status.Status = result[0]
                return status
        return assoc.send_c_store(path)

    @staticmethod
    def _unreadable_file(context: SendContext, row: Any) -> str | None:
        """Why the stored file of ``row`` cannot be read (None: it can), tried before its
        C-STORE begins, so that nothing half-sent is left on the association. A file gone
        or unreadable (a bad sector, a permission) raised out of the attempt: every attempt
        stopped at it, and the instances after it never reached the node (1 of 5 sent, the
        job failed after its attempts)."""
        try:
            with open(context.spool.path(row["path"]), "rb") as stored:
                stored.read(132)  # the preamble and "DICM": the file is there and readable
        except OSError as exc:
            return f"{type(exc).__name__}: {exc.strerror or exc}"
        return None

    def _unreadable(self, unreadable: list[tuple[str, str]], total: int) -> str:
        """The instances passed over because their stored file could not be read, named."""
        if not unreadable:
            return ""
        sample = ", ".join(f"{uid} ({error})" for uid, error in unreadable[:3])
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        return (f"{len(unreadable)} of the {counted(total, 'instance')} still to send not "
                f"sent to {self.name}: their stored file cannot be read (pas verify says "
                f"more): {sample}{more}")

    def _not_reencoded(self, not_reencoded: list[tuple[str, str]], total: int) -> str:
        """The instances passed over because they could not be re-encoded, named."""
        sample = ", ".join(f"{uid} ({error})" for uid, error in not_reencoded[:3])
        more = f" and {len(not_reencoded) - 3} more" if len(not_reencoded) > 3 else ""
        return (f"{len(not_reencoded)} of the {counted(total, 'instance')} still to send not "
                f"sent to {self.name}: {self.peer} does not accept their stored transfer "
                f"syntax and they cannot be re-encoded in one it does: {sample}{more}")

    def _failures(self, failed: list[tuple[str, int]], total: int) -> str:
        sample = ", ".join(f"{uid} (0x{code:04X})" for uid, code in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        return (f"{self.name} answered a C-STORE failure status for {len(failed)} of the "
                f"{counted(total, 'instance')} still to send: {sample}{more}")
