"""The audit trail beyond the database: journald entries and RFC 5424 syslog over TLS.

Owns: shaping each committed audit row (``appliance.store.audit``) as a DICOM PS3.15 /
IHE ATNA audit message, the copies that read the table (the outbox: one reader thread for
the journal, one per syslog collector, RFC 5425: TLS, octet-counted frames), and the
"configuration changed" event at start-up. May not touch: the audit table (append-only,
written by the store) or any other state; a copy writes only its own mark.

Why the copies read the table: the table is the record of truth, written by the daemon and
by the ``pas`` CLI alike. The copies used to be fed from an in-memory queue filled by the
daemon's own rows: the CLI's rows (a purge, a pin) never reached the journal or the
collector, and what the queue held at a kill -9, or dropped when full, was never sent. Now
each copy reads the rows past its committed mark in id order, in batches (bounded memory),
and moves the mark on after handing them over: at least once, whatever crashed. A row
committed in the daemon wakes them at once (an audit sink); a CLI's row is found at the
next poll (``audit.outbox_poll_s``). A slow or absent collector never slows the caller (a
C-STORE, a query): it only holds its reader. At a clean stop what is not sent yet is sent
for at most ``audit.stop_flush_s``; what that time leaves is counted, logged, and sent
after the next start.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import sqlite3
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from appliance.config import AuditSection, Settings
from appliance.store import audit
from appliance.store.db import Database

log = logging.getLogger("pas.audit")

# PS3.16 CID 400 event IDs and PS3.15 EventActionCode for each PAS audit event.
EVENT_CODES: dict[str, tuple[str, str, str]] = {
    "store": ("110104", "DICOM Instances Transferred", "C"),
    "retrieve": ("110104", "DICOM Instances Transferred", "R"),
    "move": ("110104", "DICOM Instances Transferred", "R"),
    "get": ("110104", "DICOM Instances Transferred", "R"),
    "export": ("110106", "Export", "R"),
    # A Storage Commitment request: PAS vouches for holding instances (PS3.15 has no event
    # of its own for it; the instances' transfer is the closest).
    "commitment": ("110104", "DICOM Instances Transferred", "E"),
    "query": ("110112", "Query", "E"),
    "delete": ("110105", "DICOM Study Deleted", "D"),
    "refile": ("110110", "Patient Record", "U"),  # a study moved to another patient
    # the RIS merged two patients (ADT^A40), or changed a patient identifier (A47)
    "merge": ("110110", "Patient Record", "U"),
    "config": ("110113", "Security Alert", "E"),
    "security": ("110113", "Security Alert", "E"),  # refused access, permissions tightened
    "enrolment": ("110114", "User Authentication", "E"),
}
APPLICATION_ACTIVITY = ("110100", "Application Activity", "E")
# The EventTypeCode of the events PS3.15 types itself (DCM); the others are typed by PAS's
# own name of the event.
EVENT_TYPES: dict[str, tuple[str, str]] = {
    "start": ("110120", "Application Start"),
    "stop": ("110121", "Application Stop"),
}
SYSLOG_FACILITY_AUTHPRIV = 10


# What XML 1.0 forbids (C0 controls but tab, LF and CR; lone surrogates; U+FFFE/U+FFFF):
# ElementTree writes them as they are, and the message is then not XML at all.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def _xml_text(value: Any) -> str:
    """Text from input (an HL7 type, an AE title, a reason) made safe for XML 1.0: each
    forbidden character written as ``\\xNN`` (``\\uNNNN`` above U+00FF) so the auditor
    still sees it was there."""
    return _NOT_XML.sub(lambda m: (f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                   else f"\\u{ord(m.group()):04x}"), str(value))


# The model a query row names when it names none (rows from before migration 10 are not
# sent, see OutboxReader; a writer that forgot it): Study Root FIND, the one QIDO-RS uses.
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def _object_ids(target: str) -> list[str]:
    """One ParticipantObjectIdentification per study (PS3.15 A.5.3.2): a store event lists
    its studies comma-joined; a WADO-RS retrieve names its path's UIDs slash-joined (study,
    series, instance), whose study is the object (the whole path, labelled a Study Instance
    UID, matched no study at the collector); any other target stays one object (a query
    is a SOP Queried object instead: _queried)."""
    parts = [p.strip() for p in target.split(",") if p.strip()]
    if len(parts) > 1 and all(_UID.fullmatch(p) for p in parts):
        return parts
    path = target.split("/")
    if len(path) > 1 and all(_UID.fullmatch(p) for p in path):
        return [path[0]]
    return [target]


def _detail(parent: ET.Element, entry: dict[str, Any]) -> None:
    """The row's detail (counts) as xs:base64Binary, under ``parent``."""
    if entry.get("detail"):
        value = base64.b64encode(str(entry["detail"])[:1000].encode()).decode("ascii")
        ET.SubElement(parent, "ParticipantObjectDetail", type="detail", value=value)


def _queried(root: ET.Element, entry: dict[str, Any]) -> None:
    """A query's participant object (PS3.15 A.5.3.2 Query): the SOP Class of the model
    asked under, ID type (110181, DCM, "SOP Class UID"), and the query itself as
    ParticipantObjectQuery (base64). For a C-FIND, that is the identifier as the viewer
    encoded it, with a ``TransferSyntax`` detail naming its encoding, so that a collector
    decodes it as DICOM (it was the row's text summary, which none can); for a QIDO-RS
    search, the request's path and query string (as dcm4chee's audit does). A row written
    before the rows kept the query (migration 13) gives its text summary, with no
    TransferSyntax detail."""
    queried = ET.SubElement(root, "ParticipantObjectIdentification",
                            ParticipantObjectID=_xml_text(entry.get("sop_class")
                                                          or STUDY_ROOT_FIND),
                            ParticipantObjectTypeCode="2", ParticipantObjectTypeCodeRole="3")
    ET.SubElement(queried, "ParticipantObjectIDTypeCode", {
        "csd-code": "110181", "codeSystemName": "DCM", "originalText": "SOP Class UID"})
    asked = entry.get("query")
    if not isinstance(asked, bytes | bytearray | memoryview):
        asked = str(entry.get("target") or "").encode()
    ET.SubElement(queried, "ParticipantObjectQuery").text = base64.b64encode(
        bytes(asked)).decode("ascii")
    if entry.get("query_syntax"):
        ET.SubElement(queried, "ParticipantObjectDetail", type="TransferSyntax",
                      value=base64.b64encode(str(entry["query_syntax"]).encode()).decode())
    _detail(queried, entry)


def _patient_ids(patient: str | None) -> list[str]:
    """The PatientIDs an audit row records (``patient``: backslash-separated, NULL when the
    row names nobody), in the row's order."""
    return [p for p in (patient or "").split(audit.PATIENT_SEPARATOR) if p]


def atna_message(entry: dict[str, Any], site: str, host: str) -> str:
    """A PS3.15 A.5 AuditMessage (XML) for one audit row.

    Attributes are passed as dicts: the schema's ``csd-code`` cannot be a keyword argument
    (written ``csd_code``, an ATNA repository validating the schema rejected every message).
    Everything taken from input goes through :func:`_xml_text`, and the detail value is
    base64 as ``xs:base64Binary`` requires.

    One Patient participant object per PatientID the row records (PS3.15 A.5.3: DICOM
    Instances Transferred, Study Deleted, Export... require it): an ATNA repository is
    searched by patient, and without it a collector could not answer "who touched this
    patient's images?" that ``pas audit --patient`` answers from the table."""
    code, display, action = EVENT_CODES.get(entry["event"], APPLICATION_ACTIVITY)
    outcome = entry.get("outcome") or "success"
    indicator = "0" if outcome == "success" else "4"  # 4: minor failure
    when = dt.datetime.fromtimestamp(entry["at"], dt.UTC).isoformat()
    root = ET.Element("AuditMessage")
    event = ET.SubElement(root, "EventIdentification", EventActionCode=action,
                          EventDateTime=when, EventOutcomeIndicator=indicator)
    ET.SubElement(event, "EventID", {"csd-code": code, "codeSystemName": "DCM",
                                     "originalText": display})
    if indicator != "0":
        ET.SubElement(event, "EventOutcomeDescription").text = _xml_text(outcome)
    kind = _xml_text(entry["event"])
    typed = EVENT_TYPES.get(entry["event"])
    ET.SubElement(event, "EventTypeCode",
                  {"csd-code": typed[0], "codeSystemName": "DCM", "originalText": typed[1]}
                  if typed else {"csd-code": kind, "codeSystemName": "PAS",
                                 "originalText": kind})
    actor = _xml_text(entry.get("actor") or "system")
    requestor_role, pas_role, moved_to = _transfer_roles(entry)
    participant = ET.SubElement(root, "ActiveParticipant", UserID=actor,
                                UserIsRequestor="true")
    if entry.get("source"):
        participant.set("NetworkAccessPointID", _xml_text(entry["source"]))
        participant.set("NetworkAccessPointTypeCode", "2")  # IP address
    _role(participant, requestor_role)
    _role(ET.SubElement(root, "ActiveParticipant", UserID=_xml_text(f"PAS@{site}"),
                        UserIsRequestor="false", NetworkAccessPointID=_xml_text(host),
                        NetworkAccessPointTypeCode="1"), pas_role)
    if moved_to:  # a C-MOVE's destination, a third participant (it was in the detail only)
        _role(ET.SubElement(root, "ActiveParticipant", UserID=_xml_text(moved_to),
                            UserIsRequestor="false"), DESTINATION_ROLE)
    ET.SubElement(root, "AuditSourceIdentification", AuditEnterpriseSiteID=_xml_text(site),
                  AuditSourceID=_xml_text(f"pas@{host}"))
    studies = [] if entry["event"] == "query" or not entry.get("target") else \
        _object_ids(str(entry["target"]))
    if entry["event"] == "query":
        _queried(root, entry)
    for object_id in studies:
        target = ET.SubElement(root, "ParticipantObjectIdentification",
                               ParticipantObjectID=_xml_text(object_id),
                               ParticipantObjectTypeCode="2",
                               ParticipantObjectTypeCodeRole="3")
        ET.SubElement(target, "ParticipantObjectIDTypeCode", {
            "csd-code": "110180", "codeSystemName": "DCM",
            "originalText": "Study Instance UID"})
        _detail(target, entry)
    for patient_id in _patient_ids(entry.get("patient")):
        person = ET.SubElement(root, "ParticipantObjectIdentification",
                               ParticipantObjectID=_xml_text(patient_id),
                               ParticipantObjectTypeCode="1",  # Person
                               ParticipantObjectTypeCodeRole="1")  # Patient
        ET.SubElement(person, "ParticipantObjectIDTypeCode", {
            "csd-code": "2", "codeSystemName": "RFC-3881", "originalText": "Patient Number"})
    return ET.tostring(root, encoding="unicode")


# PS3.15 A.5.3.7 (DICOM Instances Transferred): the process that sent the instances and the
# one that received them each carry their role (DCM 110153 Source, 110152 Destination).
SOURCE_ROLE = ("110153", "Source Role ID")
DESTINATION_ROLE = ("110152", "Destination Role ID")
_MOVED_TO = re.compile(r"C-MOVE to (\S+?):")


def _transfer_roles(entry: dict[str, Any]
                    ) -> tuple[tuple[str, str] | None, tuple[str, str] | None, str | None]:
    """The roles of the requestor and of PAS in an instances-transferred event, and a
    C-MOVE's destination AE (the detail names it: ``C-MOVE to WS1: ...``). A store: the
    requestor sent, PAS received; a retrieve: PAS sent, and the requestor received (a C-GET,
    WADO-RS), or the C-MOVE's destination did (the requestor then has no role); a prior the
    prefetch fetched: PAS received it. None where the event moves no instances. No
    participant had a role (a DPO's review, 2026-12-06)."""
    event = entry["event"]
    if event == "store":
        return SOURCE_ROLE, DESTINATION_ROLE, None
    if event != "retrieve":
        return None, None, None
    if entry.get("actor") == "prefetch":  # a prior fetched from the region: PAS received it
        return None, DESTINATION_ROLE, None
    moved = _MOVED_TO.match(str(entry.get("detail") or ""))
    if moved:
        return None, SOURCE_ROLE, moved[1]
    return DESTINATION_ROLE, SOURCE_ROLE, None


def _role(participant: ET.Element, role: tuple[str, str] | None) -> None:
    if role is not None:
        ET.SubElement(participant, "RoleIDCode", {"csd-code": role[0],
                                                  "codeSystemName": "DCM",
                                                  "originalText": role[1]})


# The RFC 5424 structured data element carrying a row's place in the audit trail's hash
# chain (appliance.store.audit.chain_link): its id and its chain. A private SD-ID is
# ``name@<private enterprise number>`` (RFC 5424 6.3.2); 32473 is the number RFC 5612 sets
# aside for documentation, used until PAS has its own.
CHAIN_SD_ID = "pasAuditChain@32473"
_HEX = re.compile(r"[0-9a-f]{64}")


def _structured_data(entry: dict[str, Any]) -> str:
    """``[pasAuditChain@32473 id="12" chain="<hex>"]`` for a chained row, "-" (none) for a
    row without a chain. Both values are digits and hex: nothing to escape."""
    chain = entry.get("chain")
    if not isinstance(chain, str) or not _HEX.fullmatch(chain):
        return "-"
    return f'[{CHAIN_SD_ID} id="{int(entry["id"])}" chain="{chain}"]'


def rfc5424(entry: dict[str, Any], site: str, host: str) -> bytes:
    """One RFC 5424 message (MSGID = the event), the ATNA XML as its body, the row's id and
    chain as structured data: the chain's head leaves the machine with every row, so that
    the table rewritten whole, its chain made anew, differs from what the collector has."""
    severity = 5 if (entry.get("outcome") or "success") == "success" else 4
    priority = SYSLOG_FACILITY_AUTHPRIV * 8 + severity
    when = dt.datetime.fromtimestamp(entry["at"], dt.UTC).isoformat(timespec="milliseconds")
    msgid = "".join(c for c in entry["event"] if 33 <= ord(c) <= 126)[:32] or "-"
    header = (f"<{priority}>1 {when.replace('+00:00', 'Z')} {host[:255]} pas {os.getpid()} "
              f"{msgid} {_structured_data(entry)}")
    return f"{header} \ufeff{atna_message(entry, site, host)}".encode()


def frame(message: bytes) -> bytes:
    """RFC 5425 octet counting: ``LEN SP MSG``."""
    return f"{len(message)} ".encode() + message


# Rows an outbox reader holds at once: a backlog (a week without a collector) is read from
# the table in batches of this many, never loaded whole (invariant 8).
OUTBOX_BATCH = 100
# The most often a copy commits its mark (one fsync'd write each): a row is one write, and
# two copies committing after each row would triple the trail's writes beside the ingest.
# A crash sends again at most this long's rows.
MARK_EVERY_S = 1.0


class OutboxReader:
    """One copy of the audit trail, fed from the table (``appliance.store.audit``'s outbox):
    a thread that reads the rows past this copy's mark in id order, hands each on, and
    advances the mark once they were handed on. The in-process notification (:meth:`wake`,
    an audit sink) makes it read at once; it also reads every ``poll_s`` seconds, which is
    how it finds the rows the ``pas`` CLI wrote in its own process (a purge, a pin).

    Why from the table and not a queue in memory: the queue was filled only by the daemon's
    own rows, lost what it held at a kill -9, and dropped rows when full. The table has them
    all; the mark (committed after the rows were handed on) says how far this copy got, so
    after a crash it resends from there: at least once, a row sent twice only when the
    crash fell between the send and the mark's commit (at most MARK_EVERY_S apart)."""

    kind = "outbox"

    def __init__(self, db: Database, sink: str, poll_s: float):
        self.db = db
        self.sink = sink
        self.poll_s = poll_s
        self.mark = 0  # the last row id handed on (the thread's; committed by _persist)
        self._committed = 0
        self._committed_at = 0.0  # monotonic
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_until = 0.0  # once stopping: hand on what is left until then (monotonic)
        self._mark_lock = threading.Lock()
        self._abandoned = False  # stop() gave up waiting: the thread commits nothing more
        self._thread: threading.Thread | None = None

    def wake(self, _entry: dict[str, Any] | None = None) -> None:
        """An audit sink: a row was committed in this process, read it now."""
        self._wake.set()

    def start(self) -> None:
        self.mark = self._committed = audit.outbox_start(self.db, self.sink)
        self._thread = threading.Thread(target=self._guarded, name=f"pas-audit-{self.kind}",
                                        daemon=True)
        self._thread.start()

    def stop(self, flush_s: float = 0.0) -> int:
        """Hand on what the table still holds past the mark, for at most ``flush_s`` seconds
        (a wait between reconnections is cut short), then stop. Returns how many rows were
        left, and logs it: the mark stays where it is and the next start sends them."""
        self._flush_until = time.monotonic() + flush_s
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            # A connection or a send begun before the stop may outlast the flush time (up
            # to its 10 s timeout): not waited for, its row counted as left and sent again.
            # The 2.5 s beyond: the collector's connection closed gracefully (at most 2 s).
            self._thread.join(flush_s + 2.5)
        with self._mark_lock:
            self._abandoned = True
            mark = self.mark
        try:
            if mark > self._committed:
                audit.outbox_advance(self.db, self.sink, mark)
            unsent = audit.count_after(self.db, mark)
        except sqlite3.Error as exc:
            log.warning("audit %s: cannot read or record its place in the audit table at "
                        "stop (%s); the next start resends from its last recorded place",
                        self.sink, exc)
            return 0
        if unsent:
            log.warning("audit %s: %d audit records not sent at stop (audit.stop_flush_s = "
                        "%g s); they stay in the database's audit table and are sent after "
                        "the next start", self.sink, unsent, flush_s)
        return unsent

    def _time_left(self) -> float | None:
        """None while running; once stopping, the seconds left to flush."""
        return self._flush_until - time.monotonic() if self._stop.is_set() else None

    def _read(self) -> list[dict[str, Any]]:
        """The next rows past the mark (clearing the wake-up first: a row committed while
        this reads wakes the next wait)."""
        self._wake.clear()
        try:
            return audit.rows_after(self.db, self.mark, OUTBOX_BATCH)
        except sqlite3.Error as exc:  # busy past the timeout, disk error: try again later
            log.warning("audit %s: cannot read the audit table (%s)", self.sink, exc)
            return []

    def _persist(self, force: bool = False) -> None:
        """Commit the mark, at most once per MARK_EVERY_S unless ``force``: what was handed
        on is not handed on again after a restart."""
        with self._mark_lock:
            if self._abandoned or self.mark <= self._committed:
                return
            if not force and time.monotonic() - self._committed_at < MARK_EVERY_S:
                return
            try:
                audit.outbox_advance(self.db, self.sink, self.mark)
                self._committed = self.mark
                self._committed_at = time.monotonic()
            except sqlite3.Error as exc:
                log.warning("audit %s: cannot record how far it got (%s)", self.sink, exc)

    def _idle(self) -> bool:
        """Nothing past the mark: False when stopping (the flush is done), else wait for a
        wake-up or the next poll (or the mark's next commit, when one is due) and True."""
        self._persist()
        if self._stop.is_set():
            return False
        self._wake.wait(self.poll_s if self.mark <= self._committed
                        else min(self.poll_s, MARK_EVERY_S))
        return True

    def _guarded(self) -> None:
        try:
            self._run()
        except Exception:  # never silently: the copy stops, the table keeps every row
            log.exception("audit %s: the outbox reader stopped", self.sink)
        finally:
            self._persist(force=True)

    def _run(self) -> None:
        raise NotImplementedError


class JournalCopy(OutboxReader):
    """The journald copy (stderr outside systemd): one entry per row, with its fields."""

    kind = "journal"

    def __init__(self, db: Database, poll_s: float):
        super().__init__(db, "journal", poll_s)

    def _run(self) -> None:
        while True:
            rows = self._read()
            if not rows:
                if self._idle():
                    continue
                return
            for entry in rows:
                journal_sink(entry)
                self.mark = entry["id"]
            self._persist()


class SyslogTlsSender(OutboxReader):
    """Sends the audit rows to one collector over TLS, reconnecting as needed.

    Its mark is kept per collector (``syslog host:port``): a collector named for the first
    time starts at the table's last row, as every copy does at the upgrade. "Handed on" is
    written to the TLS connection: RFC 5425 has no acknowledgement, so what a collector
    loses after reading it, or what the kernel still held when the connection broke, is
    not sent again."""

    kind = "syslog"

    def __init__(self, config: AuditSection, site: str, host: str, db: Database):
        super().__init__(db, f"syslog {config.syslog_host}:{config.syslog_port}",
                         config.outbox_poll_s)
        self.config = config
        self.site = site
        self.host = host
        self.sent = 0
        self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                                  cafile=str(config.syslog_ca))
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        if config.syslog_cert and config.syslog_key:
            from appliance.ops.security import check_secret_file

            check_secret_file(config.syslog_key, "audit.syslog_key")
            self.context.load_cert_chain(str(config.syslog_cert), str(config.syslog_key))

    def _connect(self, timeout: float) -> ssl.SSLSocket:
        raw = socket.create_connection((str(self.config.syslog_host), self.config.syslog_port),
                                       timeout=timeout)
        return self.context.wrap_socket(raw, server_hostname=str(self.config.syslog_host))

    def _shaped(self, entry: dict[str, Any]) -> bytes | None:
        """The frame for one row; None (logged) for a row that cannot be shaped, which must
        not hold every later row back for ever (the table still has it)."""
        try:
            return frame(rfc5424(entry, self.site, self.host))
        except Exception:
            log.exception("audit syslog: row %s cannot be shaped as an ATNA message; not "
                          "sent (pas audit shows it)", entry.get("id"))
            return None

    def _run(self) -> None:
        connection: ssl.SSLSocket | None = None
        delay = 0.5
        rows: list[dict[str, Any]] = []
        try:
            while True:
                if not rows:
                    self._persist()
                    rows = self._read()
                    if not rows:
                        if self._idle():
                            continue
                        return
                    rows.reverse()  # oldest last: popped first
                left = self._time_left()
                if left is not None and left <= 0:
                    return
                timeout = 10.0 if left is None else min(10.0, left)
                message = self._shaped(rows[-1])
                if message is None:
                    self.mark = rows.pop()["id"]
                    continue
                try:
                    if connection is None:
                        connection = self._connect(timeout)
                        delay = 0.5
                    connection.settimeout(timeout)
                    connection.sendall(message)
                    self.sent += 1
                    self.mark = rows.pop()["id"]
                except (OSError, ssl.SSLError) as exc:
                    if connection is not None:
                        with contextlib.suppress(OSError):
                            connection.close()
                    connection = None
                    self._persist(force=True)  # what went before is not sent again
                    left = self._time_left()
                    pause = delay if left is None else max(0.0, min(0.5, left))
                    log.warning("audit syslog %s:%d unreachable (%s); retrying in %.1fs",
                                self.config.syslog_host, self.config.syslog_port, exc, pause)
                    if left is None:
                        self._stop.wait(delay)  # a stop cuts the wait short: the flush begins
                        delay = min(delay * 2, 30.0)
                    else:
                        time.sleep(pause)
        finally:
            if connection is not None:
                _close_gracefully(connection)


def _close_gracefully(connection: ssl.SSLSocket) -> None:
    """Close with a TLS close_notify, reading what the collector sent meanwhile (its TLS 1.3
    session tickets) until it closes too, for at most 2 s. A plain close with those bytes
    unread makes the kernel answer with a reset, and the collector lost the records it had
    not read yet: at a stop, the last records of a flush (seen here: 2 of 5 read)."""
    with contextlib.suppress(OSError, ValueError):
        connection.settimeout(2.0)
        connection.unwrap()
    with contextlib.suppress(OSError):
        connection.close()


def journal_sink(entry: dict[str, Any]) -> None:
    """One journald entry per audit row, with searchable fields (AUDIT_EVENT=store...,
    AUDIT_PATIENT: the row's PatientIDs, backslash-separated, as in the table; AUDIT_ID: the
    row, which tells a row handed on twice after a crash from two events; AUDIT_CHAIN: the
    row's chain, ``pas audit verify``'s head to compare with)."""
    level = logging.INFO if (entry.get("outcome") or "success") == "success" else logging.WARNING
    log.log(level, "audit %s by %s on %s: %s%s", entry["event"], entry.get("actor") or "-",
            entry.get("target") or "-", entry.get("outcome"),
            f" ({entry['detail']})" if entry.get("detail") else "",
            extra={"AUDIT_EVENT": entry["event"], "AUDIT_ACTOR": entry.get("actor") or "",
                   "AUDIT_OUTCOME": entry.get("outcome") or "",
                   "AUDIT_PATIENT": entry.get("patient") or "",
                   "AUDIT_ID": str(entry.get("id") or ""),
                   "AUDIT_CHAIN": entry.get("chain") or ""})


def config_fingerprint(settings: Settings, key: bytes) -> dict[str, str]:
    """A keyed SHA-256 (HMAC) per top-level section: secrets never leave, and the key keeps
    the fingerprints from being an oracle. They were plain SHA-256 of each section's JSON,
    written to the trail, the journal and the ATNA collector: whoever read them could test
    guesses of a bearer token or a destination's password offline (security review,
    2026-12-06)."""
    data = json.loads(settings.model_dump_json())
    return {name: hmac.new(key, json.dumps(value, sort_keys=True).encode(),
                           hashlib.sha256).hexdigest()[:16]
            for name, value in sorted(data.items())}


FINGERPRINT_KEY = "config-fingerprint.key"  # in $PAS_HOME, 0600, made at the first start


def fingerprint_key(home: Path) -> bytes:
    """This home's fingerprint key, made (32 random bytes, 0600) when there is none: at the
    first start, the first after an upgrade from a version that had none (before
    2026-12-06), or after a restore on a new disk (the key is not in a backup)."""
    path = home / FINGERPRINT_KEY
    try:
        return path.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        return key


def fingerprint_key_id(key: bytes) -> str:
    """Which key a ``config`` row's fingerprints were made under (its ``key``): an HMAC of a
    constant, which says nothing of the configuration nor of the key."""
    return hmac.new(key, b"pas config fingerprint key", hashlib.sha256).hexdigest()[:16]


# The detail of a start whose previous fingerprints cannot be compared with this one's.
REBASED = ("configuration fingerprints re-based under {why}; no comparison with the previous "
           "run")


def _not_comparable(previous: dict[str, Any], fingerprint: dict[str, str], key_id: str,
                    key_made_now: bool) -> str | None:
    """Why the previous ``config`` row's fingerprints (``previous``, its detail) cannot be
    compared with ``fingerprint``, None when they can. Made under another key, or the plain
    SHA-256 of a version before 2026-12-06, every section compared different: the first
    start after the upgrade wrote a row saying all of them changed, which none had."""
    if key_made_now:
        return ("a new key (none was in this home: an upgrade from a version without one, a "
                "restore on a new disk, or the key file removed)")
    if "key" in previous:
        return None if previous["key"] == key_id else \
            "another key than the previous run's (the key file was replaced)"
    # Written before rows named their key: under this key, the sections that did not change
    # are alike; not one alike is another way (a plain SHA-256, another key).
    sections = previous.get("sections") or {}
    if any(sections.get(name) == value for name, value in fingerprint.items()):
        return None
    return ("this home's key (the previous run's fingerprints were made another way: a plain "
            "SHA-256 before 2026-12-06, or another key)")


def record_config_change(db: Database, settings: Settings) -> list[str]:
    """At start-up: an audit ``config`` event naming the sections that changed since the
    last start (none recorded: the first start). Previous fingerprints made another way (a
    key made now, another key, a version before the key) are not compared: the row says the
    fingerprints were re-based, names no section changed, and the next start compares with
    it."""
    key_made_now = not (settings.home / FINGERPRINT_KEY).exists()
    key = fingerprint_key(settings.home)
    key_id = fingerprint_key_id(key)
    fingerprint = config_fingerprint(settings, key)
    previous_rows = audit.recent(db, limit=1, event="config")
    detail: dict[str, Any] = {}
    if previous_rows and previous_rows[0].get("detail"):
        with contextlib.suppress(ValueError):
            loaded = json.loads(previous_rows[0]["detail"])
            detail = loaded if isinstance(loaded, dict) else {}
    previous = detail.get("sections")
    if not isinstance(previous, dict):
        previous = {}
    if previous:
        why = _not_comparable(detail, fingerprint, key_id, key_made_now)
        if why is not None:
            audit.record(db, "config", actor="system", target=None,
                         detail=json.dumps({"rebased": REBASED.format(why=why),
                                            "sections": fingerprint, "key": key_id}))
            return []
    changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
    if changed:
        audit.record(db, "config", actor="system", target=None,
                     detail=json.dumps({"changed": changed, "sections": fingerprint,
                                        "key": key_id}))
    return changed


class AuditTrail:
    """What the daemon installs at start-up and removes at stop: the journald copy, the
    syslog copy when a collector is configured, and the ``config`` event."""

    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self.journal = JournalCopy(db, settings.audit.outbox_poll_s)
        self.sender: SyslogTlsSender | None = None

    def install(self) -> None:
        # The marks first (a copy new to this table starts at its last row), then the rows
        # of this start: the config event below is sent.
        self.journal.start()
        audit.add_sink(self.journal.wake)
        if self.settings.audit.syslog_host:
            self.sender = SyslogTlsSender(self.settings.audit, self.settings.site,
                                          socket.gethostname(), self.db)
            self.sender.start()
            audit.add_sink(self.sender.wake)
        record_config_change(self.db, self.settings)

    def close(self) -> None:
        """Both copies flush what is left: the journal's in at most 2 s (it never waits on
        the network), the collector's in ``audit.stop_flush_s`` (at most 30 s) and 2.5 s to
        close its connection; with the daemon's 20 s for the rest, the stop stays under
        systemd's TimeoutStopSec=60s."""
        audit.remove_sink(self.journal.wake)
        self.journal.stop(2.0)
        if self.sender is not None:
            audit.remove_sink(self.sender.wake)
            self.sender.stop(self.settings.audit.stop_flush_s)
