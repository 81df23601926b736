"""A retrieve's C-STORE sub-operations: what is sent for each instance, how, and what came of it.

Owns: the markers a C-MOVE/C-GET handler yields for pynetdicom to send (:class:`SpoolFile`,
:class:`TranscodedFile`), the wrap of the sending association's ``send_c_store`` that sends
them, and the count of each sub-operation's real outcome (:class:`SubOperationTally`) that
the retrieve's audit row reports. May not touch: the audit table (``qr_retrieve.py`` has the
row written), SQL, spool writes (a copy in another syntax is ``appliance.store.transcode``'s
temp file).

Why markers: pynetdicom's Q/R service only accepts a :class:`~pydicom.dataset.Dataset` from
the handler and would re-encode it. Re-encoding a CT costs time and may change bytes. So when
the stored syntax was accepted the handler yields a small :class:`SpoolFile` and the wrapped
``send_c_store`` turns it into ``send_c_store(path)``, which pynetdicom streams from disk in
chunks (bounded memory, invariant 8; bit-exact). With the event-driven reactors installed the
file goes straight to the socket instead, on a C-MOVE sub-association and on a C-GET's own
association (appliance/dicomnet/direct_store.py: ~2x the rate of pynetdicom's DIMSE path, and
one fragment in memory: pynetdicom queues the whole file for the DUL when the viewer reads more
slowly than the disk). A copy in another syntax goes the same way: a :class:`TranscodedFile`,
re-encoded into a spool temp file only when its C-STORE is sent (decoded a frame at a time: a
300 MB object decoded in memory took the daemon up by 1.2 GB), sent from that file and removed
right after, whether the C-STORE succeeded, failed or never left (a cancelled retrieve creates
none).

Why the tally is counted here: an access audit ("DICOM Instances Transferred") must say what
the destination stored, not how many sub-operations were started (a C-MOVE to a viewer whose
disk was full was audited "success, N instances"). pynetdicom counts completed, failed and
warning for the final C-MOVE/C-GET response, but in local variables of its service class's
loop (``store_results`` in ``_move_scp``/``_get_scp``), which a handler cannot read, and it
sends that response after the handler's generator has ended, i.e. after the audit row is
written. Every sub-operation passes through the wrapped ``send_c_store``: the direct path,
pynetdicom's, the transcoded copy, and the refusals before anything is sent (no accepted
presentation context, a copy that cannot be made). Statuses are classified as pynetdicom
classifies them for the counts it sends the viewer (``STORAGE_SERVICE_CLASS_STATUS``), so the
audit row and the final response agree; an exception or a missing response is a failure, as
there. The wrap is per association object and the tally per retrieve: nothing global.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS

from appliance.dicomnet.direct_store import DirectStoreError, DirectStoreSender
from appliance.store.spool import Spool, SpoolFull
from appliance.store.transcode import TranscodeError, transcoded

log = logging.getLogger("pas.serving")

# pynetdicom's send_c_store(path) streams the file's dataset as it is, in chunks.
_config.STORE_SEND_CHUNKED_DATASET = True

# A failure reason quoted in an audit outcome: enough to name the problem, not a traceback.
_REASON_CHARS = 160

# Storage statuses (PS3.4 B.2.3, PS3.7 C) as an audit row names them; the others by
# pynetdicom's description.
_MEANINGS: list[tuple[int, int, str]] = [
    (0xA700, 0xA7FF, "out of resources"),
    (0xA900, 0xA9FF, "data set does not match SOP class"),
    (0xC000, 0xCFFF, "cannot understand"),
    (0xB000, 0xB000, "coercion of data elements"),
    (0xB006, 0xB006, "elements discarded"),
    (0xB007, 0xB007, "data set does not match SOP class"),
    (0x0110, 0x0110, "processing failure"),
    (0x0111, 0x0111, "duplicate SOP instance"),
    (0x0122, 0x0122, "SOP class not supported"),
    (0x0124, 0x0124, "not authorised"),
    (0x0213, 0x0213, "resource limitation"),
    (0xFE00, 0xFE00, "cancel"),
]


def status_meaning(status: int) -> str:
    """``0xA700 out of resources``: a C-STORE status as an audit row quotes it."""
    for low, high, meaning in _MEANINGS:
        if low <= status <= high:
            return f"0x{status:04X} {meaning}"
    known = STORAGE_SERVICE_CLASS_STATUS.get(status)
    return f"0x{status:04X} {known[1].lower() if known and known[1] else 'unknown status'}"


@dataclass
class SubOperationTally:
    """What one C-MOVE/C-GET's sub-operations did so far, as the destination answered.

    ``total`` is what the retrieve announced; ``cancelled`` and ``finished`` are set by the
    handler (a cancel, or every sub-operation handed to pynetdicom and answered)."""

    total: int = 0
    completed: int = 0
    warning: int = 0
    failed: int = 0
    first_failure: str | None = None
    first_warning: str | None = None
    # Of ``failed``: instances whose file is lost here and that the region did not give
    # back, never sent (:class:`LostInstance`), and why (kept whole: the audit says it).
    lost: int = 0
    lost_reason: str | None = None
    cancelled: bool = False
    finished: bool = False

    @property
    def answered(self) -> int:
        return self.completed + self.warning + self.failed

    def record_status(self, status: int, comment: str | None = None) -> None:
        """A C-STORE-RSP's status. Success and Warning are delivered; anything else
        (a failure, Cancel, a status pynetdicom does not know) is not."""
        category = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))[0]
        text = status_meaning(status) + (f": {comment.strip()[:64]}"
                                         if comment and comment.strip() else "")
        if category == STATUS_SUCCESS:
            self.completed += 1
        elif category == STATUS_WARNING:
            self.warning += 1
            self.first_warning = self.first_warning or text
        else:
            self.record_failure(text)

    def record_failure(self, reason: str) -> None:
        """A sub-operation that got no status: not sent, or no response."""
        self.failed += 1
        self.first_failure = self.first_failure or reason[:_REASON_CHARS]

    def record_lost(self, reason: str) -> None:
        """A sub-operation of an instance whose file is lost here: failed, never sent."""
        self.failed += 1
        self.lost += 1
        self.lost_reason = self.lost_reason or reason

    def not_stored(self, stored_by: str) -> str:
        """``3 of 10 instances not stored by VIEWER (0xA700 out of resources)``: those
        refused, failed or never sent, and the first failure (and why the lost ones were
        not sent: their own reason, whole)."""
        missing = self.total - self.completed - self.warning
        reasons = [r for r in (self.lost_reason, self.first_failure) if r]
        return (f"{missing} of {self.total} instances not stored by {stored_by}"
                + (f" ({'; '.join(reasons)})" if reasons else ""))

    def outcome(self, stored_by: str) -> str:
        """The audit outcome once the retrieve ran to its end (``finished``) or was
        cancelled: "success" only when every instance was stored (with warnings or not)."""
        if self.cancelled:
            return "cancelled"
        if self.failed:
            return f"failure: {self.not_stored(stored_by)}"
        return "success"

    def detail(self, what: str) -> str:
        """``C-MOVE to VIEWER: 7 completed, 3 failed, 0 warning`` (+ what was not sent,
        + the first warning: delivered, but not as sent)."""
        lost = f" ({self.lost} lost here, not sent)" if self.lost else ""
        text = (f"{what}: {self.completed} completed, {self.failed} failed{lost}, "
                f"{self.warning} warning")
        if self.total > self.answered:
            text += f", {self.total - self.answered} not sent"
        if self.warning:
            text += f" (stored with warnings, first {self.first_warning})"
        return text


class SpoolFile(Dataset):
    """Stands for a stored file in a C-MOVE/C-GET sub-operation: sent as raw bytes."""

    def __init__(self, path: Path, sop_class_uid: str, sop_instance_uid: str):
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self._spool_path = path

    @property
    def spool_path(self) -> Path:
        return self._spool_path


class TranscodedFile(SpoolFile):
    """Stands for a stored file to send in ``syntax`` (Explicit or Implicit VR Little Endian):
    re-encoded into a spool temp file when sent, the temp file removed once sent."""

    def __init__(self, path: Path, sop_class_uid: str, sop_instance_uid: str, syntax: str,
                 spool: Spool):
        super().__init__(path, sop_class_uid, sop_instance_uid)
        self._syntax = syntax
        self._spool = spool

    @property
    def syntax(self) -> str:
        return self._syntax

    @property
    def spool(self) -> Spool:
        return self._spool


class InstanceRemoved(Exception):
    """The instance of a sub-operation was removed (a forced purge) after its retrieve was
    planned: nothing to send."""


class RemovedInstance(Dataset):
    """Stands for such an instance in a C-MOVE/C-GET sub-operation. Its send fails (counted
    once, with ``reason``), so pynetdicom counts it failed and one fewer remaining, and names
    its SOP Instance UID in the Failed SOP Instance UID List when the retrieve read it before
    the row was gone (a page ahead); otherwise it is left out of the list. The handler
    yielded a bare string instead, which pynetdicom counts failed but not done: every later
    Pending response, and the final one, said that many sub-operations remained (1
    completed, 3 failed, 3 remaining for a study of 4), and each was an empty UID in the
    Failed SOP Instance UID List."""

    def __init__(self, reason: str, sop_instance_uid: str | None = None):
        super().__init__()
        self._reason = reason
        if sop_instance_uid:  # read a page ahead, before the purge: named in the list
            self.SOPInstanceUID = sop_instance_uid

    @property
    def reason(self) -> str:
        return self._reason

    def __bool__(self) -> bool:
        # A Dataset without elements is false, and pynetdicom sends a Pending one only when
        # it is true: left false, the sub-operation was neither sent nor counted at all.
        return True


class LostInstance(Dataset):
    """Stands for an instance whose file is lost on this appliance (flagged missing: a lost
    disk under a restored index) and that the region did not give back, in a C-MOVE/C-GET
    that serves the rest (PS3.4 C.4.2.1.4/C.4.3: deliver what can be, end 0xB000 with the
    failures counted and named). Nothing is sent for it: the wrapped ``send_c_store``
    answers it with a failure status of its own, so that pynetdicom counts it failed and
    names its SOP Instance UID in the Failed SOP Instance UID List (0008,0058) without a
    log line per instance (an exception is logged twice by pynetdicom: 600 lines for the
    300 lost files of one study). The retrieve's one WARNING is ``qr_retrieve.py``'s."""

    def __init__(self, reason: str, sop_instance_uid: str):
        super().__init__()
        self._reason = reason
        self.SOPInstanceUID = sop_instance_uid

    @property
    def reason(self) -> str:
        return self._reason

    def __bool__(self) -> bool:
        return True  # as RemovedInstance: a false Pending dataset is never sent or counted


# The status a lost instance's sub-operation is counted with (never on the wire: no C-STORE
# is sent): "Processing failure" (PS3.7 Annex C), a failure pynetdicom knows.
_LOST_STATUS = 0x0110


def stream_spool_files(assoc: Any, tally: SubOperationTally) -> None:
    """Make ``assoc.send_c_store`` send a :class:`SpoolFile` from its path, unchanged, and
    count every sub-operation's outcome in ``tally`` from now on.

    With the event-driven reactors installed (a C-MOVE sub-association, or the viewer's own
    association for a C-GET) the file goes straight to the socket
    (:mod:`appliance.dicomnet.direct_store`); otherwise, or when no accepted context carries
    the stored syntax, through pynetdicom. The wrap is installed once per association; a
    C-GET association serves its C-GETs one after the other, each with its own tally."""
    assoc._pas_tally = tally
    if getattr(assoc, "_pas_streams_files", False):
        return
    original = assoc.send_c_store
    direct = DirectStoreSender(assoc) if DirectStoreSender.available(assoc) else None

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        counted: SubOperationTally = assoc._pas_tally
        if kwargs.get("originator_aet") is not None:  # a C-MOVE's sub-operation
            kwargs["originator_aet"] = _move_originator(assoc, kwargs["originator_aet"])
        if isinstance(dataset, LostInstance):
            counted.record_lost(dataset.reason)
            status = Dataset()
            status.Status = _LOST_STATUS
            return status
        try:
            result = send(dataset, *args, **kwargs)
        except Exception as exc:  # pynetdicom counts it failed too
            counted.record_failure(_not_sent(assoc, dataset, exc))
            raise
        status = getattr(result, "Status", None)
        if status is None:  # pynetdicom: no response in time, or an invalid one
            counted.record_failure("no C-STORE response")
        else:
            counted.record_status(int(status), result.get("ErrorComment"))
        return result

    def send(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(dataset, RemovedInstance):
            raise InstanceRemoved(dataset.reason)
        if not isinstance(dataset, SpoolFile):
            return original(dataset, *args, **kwargs)
        if not isinstance(dataset, TranscodedFile):
            return send_file(dataset, dataset.spool_path, *args, **kwargs)
        try:
            with transcoded(dataset.spool, dataset.spool_path, dataset.syntax) as path:
                return send_file(dataset, path, *args, **kwargs)
        except (TranscodeError, SpoolFull) as exc:
            log.error("C-STORE of %s not sent: %s", dataset.SOPInstanceUID, exc)
            raise

    def send_file(dataset: SpoolFile, path: Path, *args: Any, **kwargs: Any) -> Any:
        if direct is not None and not args:
            result = direct.send_file(
                path, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID),
                message_id=int(kwargs.get("msg_id", 1)),
                originator_ae=kwargs.get("originator_aet"),
                originator_id=kwargs.get("originator_id"))
            if result is not None:
                status = Dataset()
                status.Status = result[0]
                if result[1]:
                    status.ErrorComment = result[1]
                return status
        return original(path, *args, **kwargs)

    assoc.send_c_store = send_c_store
    assoc._pas_streams_files = True


def _move_originator(store_assoc: Any, given: str) -> str:
    """The Move Originator Application Entity Title of a C-MOVE's sub-operation: the AE that
    asked for the C-MOVE (PS3.7 9.1.1.1), i.e. the calling AE of the association it came on.
    pynetdicom passes its own AE's title (PAS's), so a destination told apart the viewers'
    moves by nothing. pynetdicom runs the C-MOVE handler, and so this send, in the thread of
    the requesting association (an :class:`~pynetdicom.association.Association` is a thread;
    appliance/dicomnet/reactor.py serves requests there too), which is how it is found:
    the handler's event is not passed to ``send_c_store``. The Move Originator Message ID
    pynetdicom passes is already the C-MOVE request's. ``given`` when that thread is not one
    (never seen)."""
    requesting = threading.current_thread()
    if isinstance(requesting, Association) and requesting is not store_assoc:
        title = str(getattr(requesting.requestor, "ae_title", "") or "").strip()
        if title:
            return title
    log.debug("C-MOVE sub-operation outside its requesting association's thread: "
              "Move Originator %s", given)
    return given


def _not_sent(assoc: Any, dataset: Any, exc: Exception) -> str:
    """Why a sub-operation has no status, for the audit: the peer accepted no presentation
    context for the SOP class (pynetdicom raises before sending), the copy in another syntax
    could not be made, or the exchange broke."""
    if isinstance(exc, InstanceRemoved):
        return str(exc)
    sop_class = str(getattr(dataset, "SOPClassUID", "") or "")
    # PAS sends as the SCU of the storage context: on a C-GET the viewer took the SCP role.
    contexts = [cx for cx in getattr(assoc, "accepted_contexts", [])
                if cx.abstract_syntax == sop_class]
    if sop_class and not any(cx.as_scu for cx in contexts):
        if contexts:
            # A C-GET whose viewer proposed the storage context without SCP/SCU Role
            # Selection (PS3.7 D.3.3.4): it stays the SCU and PAS may not send. The row said
            # "no presentation context accepted", and IT looked for a missing SOP class.
            return (f"{UID(sop_class).name} proposed without SCP/SCU Role Selection: the "
                    "viewer did not take the SCP role")
        return f"no presentation context accepted for {UID(sop_class).name}"
    if isinstance(exc, TranscodeError | SpoolFull):
        return f"copy in another transfer syntax not made: {exc}"
    if isinstance(exc, DirectStoreError):
        return f"no C-STORE response: {exc}"
    return f"not sent: {exc}"
