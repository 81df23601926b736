"""Ingest acceptance: DCMTK storescu as the modality, DCMTK storescp as the witness.

"The dataset as sent" is what travelled in P-DATA: storescp --bit-preserving (+xa: it
accepts what PAS accepts) writes exactly that, so each PAS file's dataset part is compared
with storescp's copy of the same send.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.filereader import _read_file_meta_info, read_preamble
from pynetdicom import AE, _config
from pynetdicom.presentation import AllStoragePresentationContexts

from appliance.words import counted
from tests.support.peers import CT_DIR, MR_DIR, StoreSCP, half_written, storescu, wait_for

STORAGE_CLASSES = {str(c.abstract_syntax) for c in AllStoragePresentationContexts}


pytestmark = pytest.mark.usefixtures("pynetdicom_senders_fixed")


def dataset_part(path: Path) -> bytes:
    """The bytes after the file meta: what travels over the network."""
    with open(path, "rb") as handle:
        read_preamble(handle, False)
        _read_file_meta_info(handle)
        return handle.read()


def index_rows(home: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(home / "pas.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM instances").fetchall()
    finally:
        conn.close()


def sop_uid(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


def assert_spool_consistent(home: Path) -> None:
    """Every indexed file exists and hashes to its recorded SHA-256; no orphan, no temp."""
    rows = index_rows(home)
    spool = home / "spool"
    indexed = set()
    for row in rows:
        data = (spool / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"], row["path"]
        assert len(data) == row["size"]
        indexed.add(row["path"])
    on_disk = {str(p.relative_to(spool)) for p in spool.rglob("*.dcm")}
    assert on_disk == indexed, f"orphans: {on_disk - indexed}, missing: {indexed - on_disk}"


def test_real_sets_stored_exactly_as_sent_and_duplicates_once(pas, tmp_path: Path) -> None:
    witness = StoreSCP(tmp_path / "witness").start(["+xa"])
    try:
        for folder in (CT_DIR, MR_DIR):
            storescu(folder, pas.port, calling="MODALITY")
            storescu(folder, witness.port, called="STORESCP")
    finally:
        witness.stop()
    expected_uids = {sop_uid(p) for p in [*CT_DIR.iterdir(), *MR_DIR.iterdir()]}
    assert len(expected_uids) == 580  # 60 distinct CT (62 files: 2 re-sends) + 520 MR
    status = pas.status()
    assert status["instances"] == 580 and status["files"] == 580, status
    assert status["studies"] == 21 and status["conflicts"] == 0
    witness_by_uid = {sop_uid(p): p for p in witness.files()}
    rows = index_rows(pas.home)
    assert {r["sop_instance_uid"] for r in rows} == expected_uids
    for row in rows:
        stored = pas.home / "spool" / row["path"]
        assert dataset_part(stored) == dataset_part(witness_by_uid[row["sop_instance_uid"]])
        assert row["calling_ae"] == "MODALITY"
    assert_spool_consistent(pas.home)
    # Each association's audit row adds up to what the index holds: the re-sends apart.
    rows_said = wait_for(lambda: (lambda r: r if len(r) == 2 else None)(json.loads(
        pas.cli("audit", "--event", "store", "--json").stdout)), 30,
        what="both associations' store rows")
    assert sorted(r["detail"] for r in rows_said) == [
        "520 instances stored, 0 refused", "60 instances stored, 2 already held, 0 refused"]


def _pydicom_files() -> list[Path]:
    files = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in get_testdata_files():
            try:
                meta = dcmread(name, stop_before_pixels=True).file_meta
            except Exception:
                continue
            if str(meta.get("MediaStorageSOPClassUID", "")) in STORAGE_CLASSES:
                files.append(Path(name))
    return files


def test_every_pydicom_data_file_that_travels_is_stored_as_sent(pas, tmp_path: Path) -> None:
    """Each file goes alone (storescu stops a batch at its first unreadable file), to PAS and
    to the witness. Files storescu itself cannot send fail for both: they do not travel.
    Many test files share a SOP Instance UID, so the comparison is per UID: every version
    the witness got in a syntax PAS also negotiated is held by PAS, and everything PAS holds
    is a version someone sent."""
    files = _pydicom_files()
    assert len(files) > 150
    witness = StoreSCP(tmp_path / "witness").start(["+xa"])

    def send(path: Path) -> tuple[Path, int, int]:
        to_pas = storescu([path], pas.port, check=False, extra=["-R"]).returncode
        to_witness = storescu([path], witness.port, called="STORESCP", check=False,
                              extra=["-R"]).returncode
        return path, to_pas, to_witness

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(send, files))
        sent = [p for p, a, _ in results if a == 0]
        wait_for(lambda: len(witness.files()) >= len(sent), 30, what="witness files")
    finally:
        witness.stop()
    disagree = [(p.name, a, b) for p, a, b in results if (a == 0) != (b == 0)]
    assert not disagree, f"PAS and storescp disagree on: {disagree}"
    assert len(sent) >= 150
    pas_versions: dict[str, dict[bytes, str]] = defaultdict(dict)
    pas_index_path = {}
    for row in index_rows(pas.home):
        pas_index_path[row["sop_instance_uid"]] = row["path"]
        body = dataset_part(pas.home / "spool" / row["path"])
        pas_versions[row["sop_instance_uid"]][body] = row["transfer_syntax_uid"]
    witness_versions: dict[str, dict[bytes, str]] = defaultdict(dict)
    for path in witness.files():
        meta = dcmread(path, stop_before_pixels=True, force=True)
        witness_versions[str(meta.SOPInstanceUID)][dataset_part(path)] = str(
            meta.file_meta.TransferSyntaxUID)
    by_uid: dict[str, list[Path]] = defaultdict(list)
    for path in sent:
        by_uid[sop_uid(path)].append(path)
    assert set(pas_versions) == set(by_uid)
    strict = 0
    for uid, paths in by_uid.items():
        if len(paths) > 1:
            continue  # several test files share this UID: held (checked above), as conflicts
        ours, theirs = pas_versions[uid], witness_versions[uid]
        assert len(ours) == 1 and len(theirs) == 1, uid
        (our_body, our_syntax), (their_body, their_syntax) = *ours.items(), *theirs.items()
        if our_syntax == their_syntax:
            assert our_body == their_body, f"{paths[0].name}: stored bytes differ from sent"
            strict += 1
        elif our_body == dataset_part(paths[0]):
            strict += 1  # storescu sent PAS the file as is
        else:  # three different encodings: no byte reference; the content must still agree
            stored = pas.home / "spool" / pas_index_path[uid]
            assert dcmread(stored) == dcmread(paths[0]), paths[0].name
    assert strict >= 100  # 110 measured: the rest share UIDs or were re-encoded
    assert_spool_consistent(pas.home)


def test_unknown_and_misplaced_aes_are_rejected(pas_factory) -> None:
    pas = pas_factory({"PAS_DICOM__KNOWN_AES": '[{title = "CT1"}, '
                                                '{title = "CT2", host = "127.0.0.9"}]'})
    one = CT_DIR / "A002304_axial_19001231-076.dcm"
    unknown = storescu([one], pas.port, calling="INTRUDER", check=False)
    assert unknown.returncode != 0 and "Association Rejected" in unknown.stderr
    wrong_host = storescu([one], pas.port, calling="CT2", check=False)
    assert wrong_host.returncode != 0 and "Association Rejected" in wrong_host.stderr
    wrong_called = storescu([one], pas.port, calling="CT1", called="NOTPAS", check=False)
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stderr, wrong_called.stderr
    assert pas.status()["instances"] == 0
    storescu([one], pas.port, calling="CT1")
    assert pas.status()["instances"] == 1
    log = pas.log()
    assert "'INTRUDER' from 127.0.0.1 is not a known AE" in log
    # Which address is the pin and which the connection's (it read "is known, but from
    # 127.0.0.9, not 127.0.0.1": an engineer on site could not tell which was which).
    assert "association rejected: calling AE 'CT2' is pinned to 127.0.0.9 (its " \
        "dicom.known_aes entry's host) but connected from 127.0.0.1" in log
    # The wrong called AE title: rejected as before, and now said, audited and counted
    # (pynetdicom's own rejection left none of the three).
    assert "association from CT1 (127.0.0.1) rejected: called AE title 'NOTPAS' is not this " \
        "appliance's (PAS)" in log
    wait_for(lambda: any("called AE title 'NOTPAS'" in r["outcome"] for r in json.loads(
        pas.cli("audit", "--event", "security", "--json").stdout)), 10,
        what="the security row of the wrong called AE")
    (row,) = [r for r in json.loads(pas.cli("audit", "--event", "security", "--json").stdout)
              if "NOTPAS" in r["outcome"]]
    assert (row["actor"], row["source"], row["target"]) == ("CT1", "127.0.0.1", "NOTPAS"), row
    scraped = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    assert 'pas_access_refused_total{channel="dicom",reason="unknown-called-ae"} 1.0' in \
        scraped


def _send_raw(port: int, path: Path) -> int:
    """Send a file's dataset bytes untouched (pynetdicom streams them from disk)."""
    meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PAS")
    assert assoc.is_established
    try:
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            status = assoc.send_c_store(path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
        return int(status.Status)
    finally:
        assoc.release()


def test_malformed_datasets_get_a_failure_and_change_nothing(pas, tmp_path: Path) -> None:
    source = CT_DIR / "A002304_axial_19001231-076.dcm"
    content = source.read_bytes()
    header_end = len(content) - len(dataset_part(source))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(content[: header_end + (len(content) - header_end) // 2])
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(content[:header_end] + os.urandom(4096))
    for bad in (truncated, garbage):
        status = _send_raw(pas.port, bad)
        assert 0xC000 <= status <= 0xCFFF, hex(status)
    assert pas.status()["instances"] == 0
    assert not list((pas.home / "spool").rglob("*.dcm"))
    assert not half_written(pas.home / "spool")
    assert "truncated" in pas.log() or "cannot parse" in pas.log()
    # The daemon keeps serving: a good instance right after, from another association.
    assert _send_raw(pas.port, source) == 0x0000
    assert pas.status()["instances"] == 1


@pytest.mark.parametrize("direct_receive", ["true", "false"])
def test_a_refused_c_store_names_its_instance(pas_factory, direct_receive: str) -> None:
    """The refusal's line names the SOP Instance and Class from the C-STORE request's command
    set, there even when the dataset is broken: it read ``C-STORE from US1 refused:
    StudyInstanceUID is missing``, and the modality's operator could not tell which object
    of the study it was. Either receive path (dicom.direct_receive)."""
    from pydicom.uid import ExplicitVRLittleEndian

    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                       "PAS_DICOM__DIRECT_RECEIVE": direct_receive})
    ds = dcmread(CT_DIR / "A002304_axial_19001231-076.dcm")
    del ds.StudyInstanceUID
    ae = AE(ae_title="US1")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0xC210 and status.ErrorComment == "StudyInstanceUID is missing"
    assert (f"WARNING pas.ingest: C-STORE of SOP Instance {ds.SOPInstanceUID} (CT Image "
            f"Storage, 1.2.840.10008.5.1.4.1.1.2) from US1 (127.0.0.1) refused: "
            "StudyInstanceUID is missing") in pas.log()
    assert pas.status()["instances"] == 0


def test_conflicting_versions_are_kept_and_counted(pas, tmp_path: Path) -> None:
    source = CT_DIR / "A002304_axial_19001231-076.dcm"
    ds = dcmread(source)
    ds.StudyDescription = "CORRECTED"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    storescu([source], pas.port)
    storescu([changed], pas.port)
    storescu([changed], pas.port)  # identical re-send: no third version
    status = pas.status()
    assert status["files"] == 2 and status["instances"] == 1 and status["conflicts"] == 1
    current = [r for r in index_rows(pas.home) if r["is_current"]]
    assert len(current) == 1 and current[0]["version"] == 2
    assert dcmread(pas.home / "spool" / current[0]["path"]).StudyDescription == "CORRECTED"
    assert "received again with other bytes" in pas.log()


def test_kill_9_mid_study_loses_nothing_acknowledged(pas_factory, tmp_path: Path) -> None:
    env = {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}
    pas = pas_factory(env)
    log = tmp_path / "storescu.log"
    with open(log, "w") as out:
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", "PAS", "-aet", "MR1", "+sd", "+r", "127.0.0.1",
             str(pas.port), str(MR_DIR)],
            env={**os.environ, "TCP_NODELAY": "1"}, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: log.read_text().count("Received Store Response (Success)") >= 150,
                 60, what="150 acknowledged instances")
        pas.kill()
        sender.wait(30)
    # What storescu saw acknowledged: each "Sending file" followed by a Success response.
    acknowledged, current = set(), None
    for line in log.read_text().splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = sending.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acknowledged.add(current)
    assert len(acknowledged) >= 150
    restarted = pas_factory(env, home=pas.home)
    rows = index_rows(pas.home)
    held = {r["sop_instance_uid"] for r in rows}
    missing = {f for f in acknowledged if sop_uid(Path(f)) not in held}
    assert not missing, f"acknowledged but lost: {sorted(missing)[:5]}"
    assert not half_written(pas.home / "spool")  # recovery removed temp files
    assert_spool_consistent(pas.home)
    # The cut association's store row: written at the restart from what the index holds
    # (the row of an association is written at its end, which the kill took away).
    (cut,) = json.loads(restarted.cli("audit", "--event", "store", "--json").stdout)
    assert (cut["actor"], cut["source"]) == ("MR1", "127.0.0.1"), cut
    assert cut["outcome"] == "failure: cut by a stop of the daemon (a crash, a power loss)"
    # Each instance held is either the cut association's, as the index attributes it, or a
    # file made durable whose index commit the kill took away (never acknowledged), adopted
    # at the restart with its sender unknown and counted in the recovery row instead.
    from_sender = [r for r in rows if (r["calling_ae"], r["source_address"]) == (
        "MR1", "127.0.0.1")]
    adopted = [r for r in rows if r["source_address"] == "recovery"]
    assert len(from_sender) + len(adopted) == len(held) and len(adopted) <= 4, len(adopted)
    assert cut["detail"].startswith(f"{len(from_sender)} instances stored before the cut"), cut
    if adopted:
        (recovery,) = json.loads(restarted.cli("audit", "--event", "recovery", "--json").stdout)
        assert f"orphans_adopted={len(adopted)}" in recovery["detail"], recovery
    studies = {r[0] for r in sqlite3.connect(pas.home / "pas.sqlite").execute(
        "SELECT study_uid FROM studies")}
    assert cut["target"] == ",".join(sorted(studies)) and cut["patient"], cut
    assert "1 DICOM association cut by the daemon's last end" in restarted.log()
    storescu(MR_DIR, restarted.port, calling="MR1")
    status = restarted.status()
    assert status["instances"] == 520 and status["files"] == 520
    assert_spool_consistent(pas.home)
    rows = json.loads(restarted.cli("audit", "--event", "store", "--json").stdout)
    assert [r["outcome"] for r in rows] == ["success", cut["outcome"]]  # newest first
    # Those held before the kill: a success each, not stored a second time, and said so.
    again = f", {len(held)} already held" if held else ""
    assert rows[0]["detail"] == f"{counted(520 - len(held), 'instance')} stored{again}, " \
        "0 refused", rows[0]


def test_quota_reached_answers_out_of_resources_and_recovers(pas_factory) -> None:
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_STORAGE__QUOTA_MB": "3"})
    result = storescu(CT_DIR, pas.port, check=False, extra=["-v"])
    assert result.returncode != 0
    assert "Refused: OutOfResources" in result.stdout + result.stderr  # 0xA700
    held = pas.status()
    assert 1 <= held["instances"] <= 6 and held["bytes"] <= 3 * 1024 * 1024
    assert not half_written(pas.home / "spool")
    assert_spool_consistent(pas.home)
    assert "spool quota reached" in pas.log()


def test_real_disk_full_answers_out_of_resources_then_accepts_again(pas_factory,
                                                                     tmp_path: Path) -> None:
    home = tmp_path / "small"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(home)], check=True)
    try:
        pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true"}, home=home)
        result = storescu(CT_DIR, pas.port, check=False, extra=["-v"])
        assert "Refused: OutOfResources" in result.stdout + result.stderr  # 0xA700
        before = pas.status()["instances"]
        assert 1 <= before < 60
        assert not half_written(home / "spool")
        assert_spool_consistent(home)
        subprocess.run(["mount", "-o", "remount,size=96m", str(home)], check=True)
        storescu(CT_DIR, pas.port)
        assert pas.status()["instances"] == 60
        assert_spool_consistent(home)
        pas.stop()
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def test_the_same_instance_from_another_ae_is_a_duplicate_not_a_conflict(pas) -> None:
    one = CT_DIR / "A002304_axial_19001231-076.dcm"
    storescu([one], pas.port, calling="CT_CONSOLE")
    storescu([one], pas.port, calling="CT_ARCHIVE")  # the modality's archive re-sends it
    status = pas.status()
    assert (status["files"], status["instances"], status["conflicts"]) == (1, 1, 0)


def pydicom_part10_header(sop_class: str, sop_instance: str, syntax: str,
                          source_ae: str | None) -> bytes:
    """The reference: the same file meta written by pydicom's own writer."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    from appliance.ingest.receive import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue()


def test_the_hand_encoded_file_meta_equals_pydicoms() -> None:
    from appliance.ingest.attributes import InvalidInstance
    from appliance.ingest.receive import part10_header

    cases = [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1", None),
             ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2", "ODD"),
             ("1.2.840.10008.5.1.4.1.1.7", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.80", "EVEN")]
    for case in cases:
        ours = part10_header(*case)
        assert ours == pydicom_part10_header(*case), case
        meta = _read_file_meta_info(BytesIO(ours[128 + 4:]))
        assert str(meta.MediaStorageSOPInstanceUID) == case[1]
    with pytest.raises(InvalidInstance, match="not ASCII"):
        part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.é", "1.2.840.10008.1.2.1")
