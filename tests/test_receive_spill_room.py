"""A large C-STORE spilled to disk keeps to the spool's quota and the free-space floor as it
arrives, not only once it is whole (invariant 1: out of room is 0xA700, nothing left behind;
docs/ingest.md).

Found in review (2027-01, s38): a C-STORE written to a spill file was checked against the
quota and the floor only after its last fragment. One that kept coming (400 MB, measured)
wrote 250 MB past the floor while every other modality got 0xA700; and the 0xA700's Error
Comment was the exception's text cut at 64 characters in the middle of a number ("... 86456
needed, floor 80").
"""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import pytest
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from appliance.dicomnet.direct_receive import p_data_tf
from appliance.dicomnet.direct_store import c_store_rq, parse_command
from appliance.store.spool import Spool, SpoolFull
from tests.support import raw_ul
from tests.support.peers import MR_DIR, PasProcess, half_written, storescu, wait_for
from tests.test_ingest_spill import temp_bytes

EXPLICIT = "1.2.840.10008.1.2.1"
QUOTA_MB = 32


def test_a_spill_past_the_quota_is_dropped_as_it_arrives_and_refused(tmp_path: Path) -> None:
    """storage.quota_mb = 32 and a C-STORE whose dataset runs to 96 MB: its spill file goes
    once it no longer fits (checked every SPILL_ROOM_CHECK_BYTES it grows) while the dataset
    still arrives; the rest is read and dropped, the answer is 0xA700 with a whole Error
    Comment, and a modality stores next. Before, the spill file grew to the full 96 MB,
    checked only at the end."""
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
        "PAS_DICOM__SPILL_ABOVE_MB": "1", "PAS_STORAGE__QUOTA_MB": str(QUOTA_MB)}).start()
    try:
        raw = raw_ul.associate(pas.port, [(1, str(CTImageStorage), EXPLICIT)],
                               calling="BIGSENDER")
        uid = "1.2.826.0.1.3680043.8.498.3811"
        raw.sock.sendall(p_data_tf(1, 0x03, c_store_rq(str(CTImageStorage), uid, 5)))
        fragment = b"\0" * (raw.max_pdu - 6)
        total = 96 << 20
        for _ in range(total // len(fragment)):
            raw.sock.sendall(p_data_tf(1, 0x00, fragment))
        # Read by PAS up to what the sockets' buffers hold: the spill file is gone already
        # (before: 90 MB and more of it, there until the last fragment).
        wait_for(lambda: temp_bytes(pas) == 0, 20, what="the spill file dropped")
        assert "no room for more of its dataset" in pas.log()
        raw.sock.sendall(p_data_tf(1, 0x02, fragment[:1000]))
        kind, body = raw.read_pdu(20)
        assert kind == 0x04
        answer = parse_command(body[6:])
        assert struct.unpack("<H", answer[0x0900])[0] == 0xA700
        comment = answer[0x0902].rstrip(b" ").decode()
        assert comment == f"spool quota reached: {QUOTA_MB} MB (storage.quota_mb)", comment
        raw.release()
        assert pas.status()["instances"] == 0
        assert not half_written(pas.home / "spool")
        sent = storescu(sorted(MR_DIR.rglob("*.dcm"))[:1], pas.port)
        assert sent.returncode == 0, sent.stderr
        assert pas.status()["instances"] == 1
        assert "Traceback" not in pas.log()
    finally:
        pas.stop()


def test_the_floor_refusal_fits_an_error_comment_whole(tmp_path: Path) -> None:
    """The free-space floor's refusal, as the C-STORE-RSP carries it (64 characters): every
    figure whole, in the configuration's megabytes. Before, the exception's text, cut in
    the middle of the floor's byte count."""
    # A floor a terabyte over the free space: other tests freeing space meanwhile cannot
    # lift the disk over it.
    floor = shutil.disk_usage(tmp_path).free + (1 << 40)
    spool = Spool(tmp_path / "spool", min_free_bytes=floor)
    with pytest.raises(SpoolFull) as refused:
        spool.check_room(86456, 0)
    comment = refused.value.comment
    assert len(comment) <= 64, comment
    assert re.fullmatch(r"disk nearly full: \d+ [MG]B free, 0\.1 MB needed, floor \d+ GB",
                        comment), comment
    assert f"floor {floor}" in str(refused.value)  # the log keeps the byte counts
    with pytest.raises(SpoolFull) as over:
        Spool(tmp_path / "spool", quota_bytes=QUOTA_MB << 20).check_room(1 << 20, QUOTA_MB << 20)
    assert over.value.comment == f"spool quota reached: {QUOTA_MB} MB (storage.quota_mb)"

