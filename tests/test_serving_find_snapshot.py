"""A viewer that reads a long C-FIND answer slowly holds no SQLite read snapshot meanwhile.

C-FIND read its matches through one cursor, whose read transaction lasted as long as the
viewer took to read every answer. SQLite cannot reset its WAL past a reader's snapshot: a
viewer reading a whole-cache IMAGE search at 1.5 kB/s made the WAL grow by ~70 kB for each
instance received meanwhile (8 to 817 MiB for 11,600 instances, kept on disk until the next
start, counted by no disk check). Matches are now read a page at a time
(``serving.qr.FIND_PAGE``), each page's query read whole.

Here a bare UL viewer (tests/support/raw_ul.py, a 4 kB receive buffer) asks for the 20,000
instances of a study and reads nothing: PAS blocks in the middle of its answers. A CT is
then received, and a TRUNCATE checkpoint from outside must complete: with the cursor held,
it answered busy for as long as the viewer waited.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from appliance.dicomnet.direct_receive import p_data_tf
from appliance.serving.qr import FIND_PAGE
from appliance.store import index
from appliance.store.db import Database
from appliance.store.index import InstanceRecord, StoredFile
from tests.support import raw_ul
from tests.support.peers import CT_DIR, PasProcess, storescu, wait_for
from tests.support.slow_viewer import IMPLICIT_LITTLE_ENDIAN, c_find_rq

INSTANCES = 20000
STUDY = "1.2.826.0.1.3680043.99.1"


def _index_of_a_large_study(home: Path) -> None:
    """The index of one study of INSTANCES MR images, every row naming one 100-byte file
    that is there: start-up recovery then finds nothing to flag. With a file name per row
    and no file, it flagged the 20,000 files missing (a row, an audit row and two log lines
    each): ~18 s of the start on a quiet machine, 37 s once in a loaded CI run, a commit
    each (1.5 s since appliance/ops/recovery.py commits them 500 at a time), none of it
    what is tested here. The first row is filed by appliance.store.index, the others are its
    copies under their own SOP Instance UID, number and SHA-256 (one INSERT ... SELECT: a
    record_instance each took ~3 s)."""
    (home / "spool" / "aa").mkdir(parents=True)
    (home / "spool" / "aa" / "0.dcm").write_bytes(bytes(100))
    db = Database(home / "pas.sqlite")
    try:
        record = InstanceRecord(f"{STUDY}.1.0", "1.2.840.10008.5.1.4.1.1.4",
                                "1.2.840.10008.1.2.1", STUDY, f"{STUDY}.1",
                                patient_id="P1", modality="MR", instance_number=0)
        index.record_instance(db, record, StoredFile("aa/0.dcm", 100, f"{0:064x}"))
    finally:
        db.close()
    with closing(sqlite3.connect(home / "pas.sqlite")) as conn, conn:
        columns = ("series_fk, study_fk, sop_class_uid, transfer_syntax_uid, path, size, "
                   "received_at, routed_at, confirmed_at")
        conn.execute(
            "WITH RECURSIVE n (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?) "
            f"INSERT INTO instances (sop_instance_uid, instance_number, sha256, {columns}) "
            f"SELECT ? || n.i, n.i, printf('%064x', n.i), {columns} FROM n, instances "
            "WHERE sop_instance_uid = ? ORDER BY n.i",
            (INSTANCES, f"{STUDY}.1.", f"{STUDY}.1.0"))


def _ask_every_instance(port: int) -> raw_ul.RawAssociation:
    raw = raw_ul.associate(port, [(1, str(StudyRootQueryRetrieveInformationModelFind),
                                   IMPLICIT_LITTLE_ENDIAN)], calling="VIEWER",
                           receive_buffer=4096)
    assert raw.accepted == {1: 0}, raw.accepted
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = STUDY
    identifier.SeriesInstanceUID = ""
    identifier.SOPInstanceUID = ""
    identifier.SOPClassUID = ""
    identifier.InstanceNumber = ""
    command, query = c_find_rq(identifier=identifier)
    raw.sock.sendall(p_data_tf(1, 0x03, command) + p_data_tf(1, 0x02, query))
    return raw


def _checkpoint_completes(path: Path) -> bool:
    conn = sqlite3.connect(path, timeout=5)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return busy == 0
    finally:
        conn.close()


def test_a_viewer_reading_a_long_c_find_slowly_holds_no_snapshot(tmp_path: Path) -> None:
    assert INSTANCES > 4 * FIND_PAGE  # the answer spans pages, and fills every buffer
    home = tmp_path / "pas"
    _index_of_a_large_study(home)
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                            "PAS_HTTP__ENABLED": "false",
                            "PAS_CACHE__SCRUB_MB_PER_S": "0"}).start()
    viewer = _ask_every_instance(pas.port)
    try:
        # PAS writes answers until the viewer's 4 kB and the sockets' buffers are full (20,000
        # answers of ~300 bytes, 6 MB, are more than the 4 MB a socket may buffer), then waits.
        viewer.sock.settimeout(10)
        assert viewer.sock.recv(1024), "no answer began"
        storescu(sorted(CT_DIR.glob("*.dcm"))[:1], pas.port)  # a frame in the WAL after it
        wait_for(lambda: _checkpoint_completes(home / "pas.sqlite"), 10,
                 what="a TRUNCATE checkpoint beside the viewer's C-FIND")
        assert (home / "pas.sqlite-wal").stat().st_size == 0
    finally:
        viewer.sock.close()
        pas.stop()
