"""Destination kind ``dicom``: an instance that cannot be re-encoded does not hold back the
rest of the study.

A node that takes only Implicit VR Little Endian (storescp ``+xi``) gets RLE-stored
instances re-encoded. One whose compressed frame does not decode raised out of the
association's loop: every attempt stopped at it, the instances after it never reached the
node, and the job failed after its attempts, the rest of the study undelivered. It is now
passed over as an unreadable file is: the others are delivered, and the job fails at once
(no retry cures data that does not decode) naming that instance alone.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from tests.support.configs import everything_to, quick_retries
from tests.support.objects import tiny_ct
from tests.support.peers import StoreSCP, storescu, wait_for
from tests.test_ingest import sop_uid
from tests.test_routing import jobs_of


def rle_study(folder: Path, count: int) -> list[Path]:
    """``count`` RLE Lossless CT instances of one study; the first one's frame does not
    decode (its RLE header points past the fragment's end)."""
    folder.mkdir()
    first = tiny_ct(InstanceNumber=1)
    paths = []
    for n in range(count):
        ds = tiny_ct(first.StudyInstanceUID, first.SeriesInstanceUID, InstanceNumber=n + 1)
        ds.PixelData = bytes(range(128))
        ds.compress(RLELossless)
        if n == 0:
            header = struct.pack("<16I", 2, 64, 10_000_000, *([0] * 13))
            ds.PixelData = encapsulate([header + b"\x05" * 200])
        path = folder / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_an_instance_that_does_not_decode_does_not_hold_back_the_rest_of_the_study(
        pas_factory, tmp_path: Path) -> None:
    """Before the fix: the node got none of the three instances (the damaged one is the
    first sent), the job was retried, and it failed after its attempts naming it."""
    paths = rle_study(tmp_path / "study", 3)
    damaged, fine = sop_uid(paths[0]), {sop_uid(p) for p in paths[1:]}
    scp = StoreSCP(tmp_path / "implicit", ae_title="OLDPACS").start(["+xi"])
    try:
        config = everything_to(tmp_path / "appliance.toml", scp, timeout_s=10,
                               before=quick_retries(3))
        pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
        storescu(paths, pas.port, extra=["-xr"])  # RLE proposed: kept as sent
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["failed"], 60,
                 what="the job failed")
        received = {sop_uid(p): p for p in scp.files()}
        assert set(received) == fine
        assert all(dcmread(p).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
                   for p in received.values())
        [job] = jobs_of(pas.home)
        assert job["attempts"] == 1, job  # no retry cures data that does not decode
        error = job["last_error"]
        assert (f"1 of the 3 instances still to send not sent to pacs: OLDPACS@127.0.0.1:"
                f"{scp.port} does not accept their stored transfer syntax and they cannot "
                f"be re-encoded in one it does: {damaged} (") in error, error
        assert "cannot be re-encoded in Implicit VR Little Endian" in error, error
        assert error.endswith("; the others were delivered"), error
        assert not any(uid in error for uid in fine), error
        [listed] = json.loads(pas.cli("queue", "list", "--json").stdout)
        assert (listed["sent"], listed["instances"]) == (2, 3), listed
    finally:
        scp.stop()
