"""The audit trail: one PS3.15-shaped event per storing association and per configuration
change, in the append-only table, in the journal (stderr here) and at a real RFC 5424 syslog
collector over TLS (RFC 5425 octet-counted frames) that the test runs on loopback. The
collector starts late on purpose: PAS keeps storing while it is absent and delivers once it
is up.
"""

from __future__ import annotations

import re
import socket
import sqlite3
import ssl
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.faults.pki import make_pki
from tests.support.peers import CT_DIR, DCMTK_ENV, PasProcess, free_port, wait_for


def test_atna_message_is_well_formed_ps315() -> None:
    """Control characters from input (an HL7 type ``OR\\x01U``), several studies, a detail:
    the message parses as XML, codes are ``csd-code``, one ParticipantObjectIdentification per
    study and one per patient the row records (the Patient object was missing: an ATNA
    repository could not find a patient's events), and the detail value is base64
    (xs:base64Binary)."""
    import base64

    from appliance.ops.audit_trail import atna_message

    refusal = {"at": 1.7e9, "event": "hl7", "actor": "10.0.0.9:4100\x02", "source": None,
               "target": None, "outcome": "failure: unsupported message type OR\x01U^R01 "
               "\x0b\ufffe", "detail": "OR\x01U^R01"}
    root = ET.fromstring(atna_message(refusal, "SITE\x1f", "host"))
    description = root.find("EventIdentification/EventOutcomeDescription")
    assert description is not None
    assert description.text == "failure: unsupported message type OR\\x01U^R01 \\x0b\\ufffe"
    assert root.find("ActiveParticipant").get("UserID") == "10.0.0.9:4100\\x02"  # type: ignore[union-attr]

    assert _patient_objects(root) == []  # a row that names no patient has none
    store = {"at": 1.7e9, "event": "store", "actor": "CT1", "source": "127.0.0.1",
             "target": "1.2.3.4,1.2.3.5", "outcome": "success",
             "detail": "2 instances stored, 0 refused", "patient": "A_1\\P\x02 2"}
    root = ET.fromstring(atna_message(store, "SITE", "host"))
    for path in ("EventIdentification/EventID", "EventIdentification/EventTypeCode",
                 "ParticipantObjectIdentification/ParticipantObjectIDTypeCode"):
        for element in root.findall(path):
            assert element.get("csd-code") and element.get("csd_code") is None
    assert root.find("EventIdentification/EventID").get("csd-code") == "110104"  # type: ignore[union-attr]
    objects = _study_objects(root)
    assert [o.get("ParticipantObjectID") for o in objects] == ["1.2.3.4", "1.2.3.5"]
    # One Patient object per PatientID the row records (PS3.15 A.5.3), input made XML-safe.
    assert _patient_objects(root) == ["A_1", "P\\x02 2"]
    for obj in objects:
        detail = obj.find("ParticipantObjectDetail")
        assert detail is not None
        assert base64.b64decode(detail.get("value"), validate=True).decode() == \
            "2 instances stored, 0 refused"
    query = {**store, "event": "query", "target": "STUDY PatientID=P1, Modality=CT",
             "patient": "P1",  # as audit.record writes it: the PatientID asked for exactly
             "sop_class": PATIENT_ROOT_FIND, "detail": "2 results"}
    root = ET.fromstring(atna_message(query, "SITE", "host"))
    # PS3.15 A.5.3.2 Query: the SOP Class queried, the query itself; no Study object (the
    # keys were labelled a Study Instance UID), and the patient asked for.
    assert _study_objects(root) == []
    assert _queried(root) == (PATIENT_ROOT_FIND, "STUDY PatientID=P1, Modality=CT")
    assert _patient_objects(root) == ["P1"]
    assert len(root.findall("ParticipantObjectIdentification")) == 2


PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"


def _queried(root: ET.Element) -> tuple[str, str]:
    """The one "SOP Queried" object of a query message (PS3.15 A.5.3.2: System object, role
    Report, ID type (110181, DCM, "SOP Class UID"), the query in ParticipantObjectQuery as
    base64) of a row with no query bytes: (the SOP Class UID, the query decoded as text)."""
    uid, query, syntax = _queried_as_sent(root)
    assert syntax is None
    return uid, query.decode()


def _queried_as_sent(root: ET.Element) -> tuple[str, bytes, str | None]:
    """The same object: (the SOP Class UID, the query's bytes, the transfer syntax a
    ``TransferSyntax`` detail names, or None)."""
    import base64

    [obj] = root.findall("ParticipantObjectIdentification/ParticipantObjectIDTypeCode"
                         "[@csd-code='110181']/..")
    assert (obj.get("ParticipantObjectTypeCode"), obj.get("ParticipantObjectTypeCodeRole")) \
        == ("2", "3")
    assert obj[0].attrib == {"csd-code": "110181", "codeSystemName": "DCM",
                             "originalText": "SOP Class UID"}
    query = obj.find("ParticipantObjectQuery")
    assert query is not None and query.text is not None
    syntax = obj.find("ParticipantObjectDetail[@type='TransferSyntax']")
    return (obj.get("ParticipantObjectID") or "", base64.b64decode(query.text, validate=True),
            None if syntax is None else base64.b64decode(syntax.get("value") or "").decode())


def _study_objects(root: ET.Element) -> list[ET.Element]:
    """The Study participant objects (PS3.15 A.5.3: System object, role Report, ID type
    110180 Study Instance UID): every System/Report object but a query's SOP Queried one."""
    found = [obj for obj in root.findall(
        "ParticipantObjectIdentification[@ParticipantObjectTypeCode='2']"
        "[@ParticipantObjectTypeCodeRole='3']")
        if obj.find("ParticipantObjectIDTypeCode[@csd-code='110181']") is None]
    for obj in found:
        code = obj.find("ParticipantObjectIDTypeCode")
        assert code is not None and code.attrib == {
            "csd-code": "110180", "codeSystemName": "DCM", "originalText": "Study Instance UID"}
    return found


def _patient_objects(root: ET.Element) -> list[str]:
    """The PatientIDs of the Patient participant objects, checked for the shape PS3.15 A.5.3
    asks (Person, role Patient, ID type (2, RFC-3881, "Patient Number"), nothing else)."""
    patients = []
    for obj in root.findall("ParticipantObjectIdentification"):
        if obj.get("ParticipantObjectTypeCodeRole") != "1":
            continue
        assert obj.get("ParticipantObjectTypeCode") == "1"
        assert [child.tag for child in obj] == ["ParticipantObjectIDTypeCode"]
        assert obj[0].attrib == {"csd-code": "2", "codeSystemName": "RFC-3881",
                                 "originalText": "Patient Number"}
        patients.append(obj.get("ParticipantObjectID") or "")
    return patients


def test_atna_message_of_a_wado_rs_retrieve_cut_short() -> None:
    """A WADO-RS row names its path's UIDs (study/series/instance): the Study object is the
    study (it was the whole path, which no collector matched as a Study Instance UID), and a
    retrieve the viewer left before the end is a failure (EventOutcomeIndicator 4) whose
    description says how much was sent."""
    from appliance.ops.audit_trail import atna_message

    row = {"at": 1.7e9, "event": "retrieve", "actor": "anonymous", "source": "10.0.0.7",
           "target": "1.2.3.4/1.2.3.4.5/1.2.3.4.5.6", "patient": "P1",
           "outcome": "failure: the client went away before the end, after 0 of 1 instance",
           "detail": "0 of 1 instance (WADO-RS frames 1,2)"}
    root = ET.fromstring(atna_message(row, "SITE", "host"))
    event = root.find("EventIdentification")
    assert event is not None and event.get("EventOutcomeIndicator") == "4"
    assert event.get("EventActionCode") == "R"
    assert root.findtext("EventIdentification/EventOutcomeDescription") == row["outcome"]
    assert [o.get("ParticipantObjectID") for o in _study_objects(root)] == ["1.2.3.4"]
    assert _patient_objects(root) == ["P1"]
    whole = atna_message({**row, "target": "1.2.3.4", "outcome": "success"}, "SITE", "host")
    root = ET.fromstring(whole)
    assert root.find("EventIdentification").get("EventOutcomeIndicator") == "0"  # type: ignore[union-attr]
    assert [o.get("ParticipantObjectID") for o in _study_objects(root)] == ["1.2.3.4"]


class SyslogTlsCollector:
    """A TLS syslog receiver (RFC 5425 framing), loopback only."""

    def __init__(self, pki: Path, port: int):
        self.port = port
        self.messages: list[str] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
        self.sock = socket.create_server(("127.0.0.1", port))
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> SyslogTlsCollector:
        self.thread.start()
        return self

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._read, args=(raw,), daemon=True).start()

    def _read(self, raw: socket.socket) -> None:
        try:
            self._frames(raw)
        except OSError:  # the collector was stopped under an open connection
            return

    def _frames(self, raw: socket.socket) -> None:
        with self.context.wrap_socket(raw, server_side=True) as conn:
            buffer = b""
            while not self._stop.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
                while b" " in buffer:
                    length, rest = buffer.split(b" ", 1)
                    if len(rest) < int(length):
                        break
                    self.messages.append(rest[:int(length)].decode())
                    buffer = rest[int(length):]

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


# The structured data: "-", or the row's place in the audit chain ([pasAuditChain@32473 ...]).
HEADER = re.compile(r"^<(\d+)>1 (\S+) (\S+) pas (\d+) (\S+) (?:-|\[[^]]*\]) "
                    r"\ufeff(<AuditMessage.*)$", re.S)


def _by_msgid(messages: list[str], msgid: str) -> list[ET.Element]:
    found = []
    for message in messages:
        match = HEADER.match(message)
        assert match, f"not RFC 5424: {message[:200]!r}"
        if match.group(5) == msgid:
            found.append(ET.fromstring(match.group(6)))
    return found


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return make_pki(tmp_path / "pki")


def test_store_and_config_events_reach_table_journal_and_tls_syslog(tmp_path: Path,
                                                                    pki: Path) -> None:
    syslog_port = free_port()
    env = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
           "PAS_AUDIT__SYSLOG_HOST": "127.0.0.1", "PAS_AUDIT__SYSLOG_PORT": str(syslog_port),
           "PAS_AUDIT__SYSLOG_CA": str(pki / "ca.crt")}
    home = tmp_path / "pas"
    pas = PasProcess(home, env).start()
    collector = None
    try:
        files = sorted(str(p) for p in CT_DIR.glob("*.dcm"))[:3]
        subprocess.run(["storescu", "-aec", "PAS", "-aet", "CT1", "127.0.0.1", str(pas.port),
                        *files], env=DCMTK_ENV, check=True, capture_output=True, timeout=60)
        # Collector absent so far: the store happened anyway; now it comes up.
        collector = SyslogTlsCollector(pki, syslog_port).start()
        wait_for(lambda: _by_msgid(collector.messages, "store"), 30, what="store at syslog")
        store = _by_msgid(collector.messages, "store")[0]
        event = store.find("EventIdentification")
        assert event is not None and event.get("EventActionCode") == "C"
        assert event.get("EventOutcomeIndicator") == "0"
        assert event.find("EventID").get("csd-code") == "110104"  # type: ignore[union-attr]
        requestor = store.find("ActiveParticipant[@UserIsRequestor='true']")
        assert requestor is not None and requestor.get("UserID") == "CT1"
        assert requestor.get("NetworkAccessPointID") == "127.0.0.1"
        studies = [o.get("ParticipantObjectID") for o in _study_objects(store)]
        from pydicom import dcmread

        headers = [dcmread(f, stop_before_pixels=True) for f in files]
        expected = sorted({str(h.StudyInstanceUID) for h in headers})
        assert studies == expected  # one object per study
        # ... and one per patient, the PatientID of the files sent; nothing else.
        patients = sorted({str(h.PatientID) for h in headers})
        assert _patient_objects(store) == patients
        assert len(store.findall("ParticipantObjectIdentification")) == \
            len(expected) + len(patients)
        assert _by_msgid(collector.messages, "config"), "first start records the configuration"

        conn = sqlite3.connect(home / "pas.sqlite")
        rows = conn.execute("SELECT event, actor, source, target, detail FROM audit "
                            "WHERE event = 'store'").fetchall()
        assert rows == [("store", "CT1", "127.0.0.1", ",".join(expected),
                         "3 instances stored, 0 refused")]
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit SET outcome = 'success'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM audit")
        conn.close()
        assert "audit store by CT1" in pas.log()  # the journal copy (stderr outside systemd)
    finally:
        pas.stop()

    def config_events() -> list[tuple[str]]:
        conn = sqlite3.connect(home / "pas.sqlite")
        try:
            return conn.execute("SELECT detail FROM audit WHERE event = 'config'").fetchall()
        finally:
            conn.close()

    def restart(extra: dict[str, str]) -> None:
        # The same ports as the first run: only what the test changes may differ.
        again = PasProcess(home, env)
        again.env = {**pas.env, **extra}  # every port PasProcess picked, as in the first run
        again.port = pas.port
        again.start().stop()

    # Same configuration again: no new event. A changed [cache]: an event naming it.
    restart({})
    assert len(config_events()) == 1
    restart({"PAS_CACHE__MIN_RETENTION_DAYS": "30"})
    events = config_events()
    assert len(events) == 2 and '"changed": ["cache"]' in events[-1][0]
    if collector is not None:
        collector.stop()


def _sent_by_pas(home: Path) -> Counter[tuple[str, str]]:
    """(event, actor) of every audit row in the appliance's database."""
    conn = sqlite3.connect(home / "pas.sqlite")
    try:
        rows = conn.execute("SELECT event, coalesce(actor, 'system') FROM audit").fetchall()
    finally:
        conn.close()
    return Counter((event, actor) for event, actor in rows)


def _received(messages: list[str]) -> Counter[tuple[str, str]]:
    """(MSGID, requesting participant) of every message the collector read."""
    found: Counter[tuple[str, str]] = Counter()
    for message in messages:
        match = HEADER.match(message)
        assert match, f"not RFC 5424: {message[:200]!r}"
        requestor = ET.fromstring(match.group(6)).find("ActiveParticipant[@UserIsRequestor='true']")
        assert requestor is not None
        found[(match.group(5), requestor.get("UserID") or "")] += 1
    return found


def _stores_while_the_collector_is_down(pas: PasProcess, modalities: int,
                                        long_wait: bool = True) -> None:
    """``modalities`` associations store one image each while the collector is down; with
    ``long_wait`` once the sender waits 8 s before it tries again (down since the start)."""
    if long_wait:
        wait_for(lambda: "retrying in 8.0s" in pas.log(), 30, what="the sender's 8 s wait")
    files = sorted(CT_DIR.glob("*.dcm"))
    for n in range(modalities):
        subprocess.run(["storescu", "-aec", "PAS", "-aet", f"CT{n}", "127.0.0.1",
                        str(pas.port), str(files[n])], env=DCMTK_ENV, check=True,
                       capture_output=True, timeout=60)
    wait_for(lambda: sum(n for (event, _), n in _sent_by_pas(pas.home).items()
                         if event == "store") == modalities, 30, what="the store records")


def test_a_clean_stop_sends_the_audit_records_still_queued(tmp_path: Path,
                                                             pki: Path) -> None:
    """The records of the last associations before a stop (``systemctl stop``, an upgrade)
    were queued for the syslog collector and dropped by the stop when the sender was
    waiting to reconnect or had not reached them: they were only in the database. Now a
    clean stop sends what is queued first (audit.stop_flush_s, 5 s by default)."""
    syslog_port = free_port()
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_AUDIT__SYSLOG_HOST": "127.0.0.1", "PAS_AUDIT__SYSLOG_PORT": str(syslog_port),
        "PAS_AUDIT__SYSLOG_CA": str(pki / "ca.crt"),
        # What is checked is that the stop sends the queue, not how fast: a budget a loaded
        # 2-core machine cannot miss (the 5 s default once ran out there: 2 of 5 sent; the
        # bounded give-up is the next test's).
        "PAS_AUDIT__STOP_FLUSH_S": "20"}).start()
    collector = None
    try:
        _stores_while_the_collector_is_down(pas, 4)
        collector = SyslogTlsCollector(pki, syslog_port).start()  # back, as the stop comes
        recorded = _sent_by_pas(pas.home)
        pas.stop(timeout=60)
        assert pas.proc is not None and pas.proc.returncode == 0, pas.log()[-3000:]
        # Nothing recorded during the stop but its own row (ATNA Application Stop).
        recorded[("stop", "system")] += 1
        assert _sent_by_pas(pas.home) == recorded
        try:
            wait_for(lambda: _received(collector.messages) == recorded, 10,
                     what=f"{sum(recorded.values())} records at the collector")
        except TimeoutError:
            raise AssertionError(f"recorded {dict(recorded)}, the collector read "
                                 f"{dict(_received(collector.messages))}; PAS's log ends:\n"
                                 f"{pas.log()[-2000:]}") from None
        assert recorded[("store", "CT3")] == 1 and recorded[("config", "system")] == 1
        assert "not sent at stop" not in pas.log()
        # ATNA's Application Activity, typed Start and Stop (PS3.15 A.5.3.1).
        for msgid, code in (("start", "110120"), ("stop", "110121")):
            [message] = _by_msgid(collector.messages, msgid)
            event = message.find("EventIdentification")
            assert event is not None
            assert event.find("EventID").get("csd-code") == "110100"  # type: ignore[union-attr]
            typed = event.find("EventTypeCode")
            assert typed is not None and (typed.get("csd-code"), typed.get(
                "codeSystemName")) == (code, "DCM"), ET.tostring(message)
    finally:
        pas.stop()
        if collector is not None:
            collector.stop()


def test_a_stop_gives_up_on_an_absent_collector_in_bounded_time_and_says_how_many(
        tmp_path: Path, pki: Path) -> None:
    """No collector at all: the stop waits at most audit.stop_flush_s, then logs how many
    records the collector did not get (the database has them)."""
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_AUDIT__SYSLOG_HOST": "127.0.0.1", "PAS_AUDIT__SYSLOG_PORT": str(free_port()),
        "PAS_AUDIT__SYSLOG_CA": str(pki / "ca.crt"), "PAS_AUDIT__STOP_FLUSH_S": "1"}).start()
    try:
        _stores_while_the_collector_is_down(pas, 2, long_wait=False)
        recorded = sum(_sent_by_pas(pas.home).values()) + 1  # and the stop's own row
        pas.stop()
        assert pas.proc is not None and pas.proc.returncode == 0, pas.log()[-3000:]
        # They stay in the table, past the collector's mark: the next start sends them
        # (test_records_not_sent_before_a_kill_9_are_sent_once_after_the_restart).
        assert (f"{recorded} audit records not sent at stop (audit.stop_flush_s = 1 s); "
                "they stay in the database's audit table and are sent after the next "
                "start") in pas.log()
    finally:
        pas.stop()


def _syslog_env(pki: Path, port: int) -> dict[str, str]:
    return {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
            "PAS_AUDIT__SYSLOG_HOST": "127.0.0.1", "PAS_AUDIT__SYSLOG_PORT": str(port),
            "PAS_AUDIT__SYSLOG_CA": str(pki / "ca.crt"),
            "PAS_CACHE__SCRUB_MB_PER_S": "0"}  # no background pass: the rows are the test's


def _stored_study(pas: PasProcess, calling: str) -> str:
    """Store one CT file from ``calling``; its Study Instance UID, once its row is in."""
    from pydicom import dcmread

    path = sorted(CT_DIR.glob("*.dcm"))[0]
    subprocess.run(["storescu", "-aec", "PAS", "-aet", calling, "127.0.0.1", str(pas.port),
                    str(path)], env=DCMTK_ENV, check=True, capture_output=True, timeout=60)
    wait_for(lambda: _sent_by_pas(pas.home)[("store", calling)] == 1, 30,
             what="the store record")
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _all_received_once(collector: SyslogTlsCollector, home: Path, pas: PasProcess) -> None:
    """Wait until the collector holds every row of the table, each once (MSGID and the
    requesting participant counted, as the rows' event and actor)."""
    try:
        wait_for(lambda: _received(collector.messages) == _sent_by_pas(home), 30,
                 what="every audit record at the collector")
    except TimeoutError:
        raise AssertionError(f"recorded {dict(_sent_by_pas(home))}, the collector read "
                             f"{dict(_received(collector.messages))}; PAS's log ends:\n"
                             f"{pas.log()[-2000:]}") from None


def test_records_the_cli_writes_reach_the_collector_and_the_journal(tmp_path: Path,
                                                                   pki: Path) -> None:
    """An operator's ``pas cache pin`` and ``pas cache purge --force`` write their rows in
    the CLI's own process, which has no syslog sender: they were in the table only, never at
    the collector nor in the journal. The daemon's copies now read the table, and find them
    at their next poll while the daemon runs."""
    from appliance.cli.common import login_name

    operator = f"operator:{login_name()}"
    syslog_port = free_port()
    collector = SyslogTlsCollector(pki, syslog_port).start()
    pas = PasProcess(tmp_path / "pas", _syslog_env(pki, syslog_port)).start()
    try:
        study = _stored_study(pas, "CT1")
        pas.cli("cache", "pin", study, "--days", "1")
        pas.cli("cache", "purge", study, "--force")
        assert _sent_by_pas(pas.home)[("delete", operator)] == 1
        wait_for(lambda: _received(collector.messages)[("delete", operator)] == 1, 30,
                 what="the purge's record at the collector")
        pin = [m for m in _by_msgid(collector.messages, "pin")
               if m.find("ActiveParticipant[@UserIsRequestor='true']").get("UserID")  # type: ignore[union-attr]
               == operator]
        assert [o.get("ParticipantObjectID") for o in _study_objects(pin[0])] == [study]
        # A viewer's C-FIND in the Patient Root model: the SOP Class it asked under and its
        # keys reach the collector as PS3.15 A.5.3.2 wants them.
        subprocess.run(["findscu", "-P", "-aet", "VIEWER", "-aec", "PAS", "-k",
                        "QueryRetrieveLevel=PATIENT", "-k", "PatientID=NOBODY", "127.0.0.1",
                        str(pas.port)], env=DCMTK_ENV, check=True, capture_output=True,
                       timeout=60)
        wait_for(lambda: _by_msgid(collector.messages, "query"), 30, what="the query record")
        [query] = _by_msgid(collector.messages, "query")
        # The query as findscu encoded it, read back as DICOM in the syntax the message
        # names (it was the row's text summary, which no collector decodes as DICOM).
        model, identifier, syntax = _queried_as_sent(query)
        assert model == PATIENT_ROOT_FIND and syntax is not None
        assert syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian), syntax
        keys = read_dataset(BytesIO(identifier), is_implicit_VR=syntax == ImplicitVRLittleEndian,
                            is_little_endian=True)
        assert (keys.QueryRetrieveLevel, keys.PatientID) == ("PATIENT", "NOBODY")
        assert _patient_objects(query) == ["NOBODY"]
        _all_received_once(collector, pas.home, pas)  # and nothing twice
        # The journald copy (the daemon's stderr here) has them too.
        wait_for(lambda: f"audit delete by {operator} on {study}: success" in pas.log(), 10,
                 what="the purge's record in the daemon's journal")
        assert f"audit pin by {operator} on {study}: success" in pas.log()
    finally:
        pas.stop()
        collector.stop()


def test_records_not_sent_before_a_kill_9_are_sent_once_after_the_restart(
        tmp_path: Path, pki: Path) -> None:
    """The collector is down while two modalities store and an operator pins; then the
    daemon is killed (SIGKILL): what it had queued in memory for the collector was lost,
    though the table had it. Now, once restarted with the collector up, it sends every row
    the collector has not had, each exactly once (nothing of it had been sent: nothing is
    sent twice), and a clean stop after that sends nothing more."""
    syslog_port = free_port()
    env = _syslog_env(pki, syslog_port)
    home = tmp_path / "pas"
    pas = PasProcess(home, env).start()
    collector = None
    try:
        _stores_while_the_collector_is_down(pas, 2, long_wait=False)
        study = _stored_study(pas, "CT9")
        pas.cli("cache", "pin", study, "--days", "1")
        recorded = _sent_by_pas(home)
        assert sum(n for (event, _), n in recorded.items() if event == "pin") == 1
        pas.kill()
        collector = SyslogTlsCollector(pki, syslog_port).start()
        again = PasProcess(home, env)
        again.env = pas.env  # the same ports: only the process is new
        again.port = pas.port
        pas = again.start()
        _all_received_once(collector, home, pas)
        final = _sent_by_pas(home)
        # The restart's own row (ATNA Application Start), and what start-up recovery cleaned.
        assert (final - recorded)[("start", "system")] == 1, final - recorded
        assert set(final - recorded) <= {("start", "system"), ("recovery", "system")}
        assert _received(collector.messages)[("store", "CT9")] == 1
        pas.stop(timeout=60)
        assert pas.proc is not None and pas.proc.returncode == 0, pas.log()[-3000:]
        stopped = _sent_by_pas(home)  # and the stop's, sent by the stop's last flush
        assert stopped - final == Counter({("stop", "system"): 1}), stopped - final
        assert _received(collector.messages) == stopped
        assert "not sent at stop" not in pas.log()
    finally:
        pas.stop()
        if collector is not None:
            collector.stop()


def test_the_first_start_after_the_upgrade_does_not_send_the_history(tmp_path: Path,
                                                                      pki: Path) -> None:
    """A database of the version before the outbox (schema 9) holding three rows: the first
    start of this version sends the rows written from then on (its config event), not the
    history: a collector would be flooded with years of rows at an upgrade. The history
    stays in the table (``pas audit``)."""
    from appliance.store.db import Database
    from appliance.store.schema import MIGRATIONS

    home = tmp_path / "pas"
    old = Database(home / "pas.sqlite", migrations=MIGRATIONS[:9])
    with old.transaction() as conn:  # as the previous version wrote them
        for n in range(3):
            conn.execute("INSERT INTO audit (at, event, actor, target, outcome) VALUES "
                         "(?, 'store', 'OLD1', '1.2.3', 'success')", (1.7e9 + n,))
    old.close()
    syslog_port = free_port()
    collector = SyslogTlsCollector(pki, syslog_port).start()
    pas = PasProcess(home, _syslog_env(pki, syslog_port)).start()
    try:
        wait_for(lambda: _by_msgid(collector.messages, "config"), 30, what="the config event")
        _stored_study(pas, "CT1")
        wait_for(lambda: _received(collector.messages)[("store", "CT1")] == 1, 30,
                 what="the new store record")
        history = _sent_by_pas(home)[("store", "OLD1")]
        assert history == 3
        received = _received(collector.messages)
        assert received[("store", "OLD1")] == 0
        assert received == _sent_by_pas(home) - Counter({("store", "OLD1"): 3})
    finally:
        pas.stop()
        collector.stop()


def test_the_participants_of_instances_transferred_carry_their_roles() -> None:
    """PS3.15 A.5.3.7: the process that sent and the one that received each carry their
    role (110153 Source, 110152 Destination); none had one, and a C-MOVE's destination was
    in the detail only."""
    from appliance.ops.audit_trail import atna_message

    def roles(entry: dict[str, Any]) -> dict[str, str | None]:
        root = ET.fromstring(atna_message({"at": 1.7e9, "outcome": "success",
                                           "source": "10.0.0.7", **entry}, "SITE", "host"))
        found = {}
        for participant in root.findall("ActiveParticipant"):
            role = participant.find("RoleIDCode")
            found[participant.get("UserID") or ""] = None if role is None else role.get(
                "csd-code")
        return found

    assert roles({"event": "store", "actor": "CT1", "target": "1.2.3"}) == {
        "CT1": "110153", "PAS@SITE": "110152"}
    assert roles({"event": "retrieve", "actor": "VIEWER", "target": "1.2.3",
                  "detail": "C-GET: 3 completed, 0 failed, 0 warning"}) == {
        "VIEWER": "110152", "PAS@SITE": "110153"}
    assert roles({"event": "retrieve", "actor": "VIEWER", "target": "1.2.3",
                  "detail": "C-MOVE to WS1: 3 completed, 0 failed, 0 warning"}) == {
        "VIEWER": None, "PAS@SITE": "110153", "WS1": "110152"}
    assert roles({"event": "retrieve", "actor": "prefetch", "target": "1.2.3"}) == {
        "prefetch": None, "PAS@SITE": "110152"}
    assert roles({"event": "query", "actor": "VIEWER", "target": "STUDY PatientID=X"}) == {
        "VIEWER": None, "PAS@SITE": None}
