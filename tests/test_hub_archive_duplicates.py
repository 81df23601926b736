"""The hub's ``dicomweb`` archive against an archive that refuses duplicates (409, FailureReason
45070, as Microsoft's DICOM service documents; Google's answers 409 too): for a UID the archive
held before the STOW, the read-back decides, not the STOW's answer.

Found in review (s39): a round whose STOW stored the batch but lost its answer was refused
(as it should: nothing was confirmed); on every later round QIDO-RS said "held", the STOW was
refused as a duplicate, then each instance alone too ("not accepted by STOW-RS"), and the
read-back, run only for held UIDs the STOW accepted, never ran. The transfer's commit was
refused (502 archive_refused) at every round, for ever, while the archive held every instance
bit-exact. The same for a UID the region held from elsewhere (a hub killed between the STOW
and recording it archived). The archive here is a small real HTTP server
(tests/support/refusing_archive.py); the archiver is the real ``DicomWebArchive``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from appliance.hub.archive import ArchiveRefused, DicomWebArchive, RebuiltInstance
from appliance.hub.config import ArchiveSection
from tests.support.peers import MR_DIR
from tests.support.refusing_archive import RefusingArchive


@pytest.fixture
def region() -> Iterator[RefusingArchive]:
    archive = RefusingArchive()
    yield archive
    archive.stop()


def _rebuilt(folder: Path, sources: list[Path]) -> list[RebuiltInstance]:
    instances = []
    for source in sources:
        data = source.read_bytes()
        path = folder / source.name
        path.write_bytes(data)
        uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        instances.append(RebuiltInstance(uid, path, len(data), hashlib.sha256(data).hexdigest()))
    return instances


def _archiver(region: RefusingArchive) -> DicomWebArchive:
    return DicomWebArchive(ArchiveSection(kind="dicomweb", url=region.url, timeout_s=10))


def _other_version(source: Path) -> bytes:
    ds = dcmread(source)
    ds.ImageComments = "another version"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_batch_stored_with_its_answer_lost_is_archived_at_the_next_round(
        tmp_path: Path, region: RefusingArchive) -> None:
    """Before the fix: every round after the first refused, "not accepted by STOW-RS"."""
    instances = _rebuilt(tmp_path, sorted(MR_DIR.glob("*.dcm"))[:2])
    region.lose_answer_for = {instances[0].sop_instance_uid}
    archiver = _archiver(region)

    with pytest.raises(ArchiveRefused):  # stored, but nothing said so: not confirmed
        archiver.store(instances, "SITE-A")
    assert set(region.held) == {i.sop_instance_uid for i in instances}

    archiver.store(instances, "SITE-A")  # QIDO: held; STOW: 409 (45070); read-back: same
    assert sorted(region.reads) == sorted(i.sop_instance_uid for i in instances)
    assert region.stows[-1] == [i.sop_instance_uid for i in instances]  # one request, no
    # one-by-one re-sends of UIDs the read-back decides for
    assert len(region.stows) == 2


def test_a_uid_held_bit_exact_beside_a_new_one_is_archived(
        tmp_path: Path, region: RefusingArchive) -> None:
    """The region held one instance already (from another path, or a hub killed between the
    STOW and recording it archived): 202, one stored, one refused as a duplicate."""
    instances = _rebuilt(tmp_path, sorted(MR_DIR.glob("*.dcm"))[2:4])
    region.hold(instances[0].path.read_bytes())

    _archiver(region).store(instances, "SITE-A")
    assert region.reads == [instances[0].sop_instance_uid]
    assert region.held[instances[1].sop_instance_uid][2] == instances[1].path.read_bytes()


def test_a_uid_held_with_other_bytes_is_refused_naming_both_digests(
        tmp_path: Path, region: RefusingArchive) -> None:
    source = sorted(MR_DIR.glob("*.dcm"))[4]
    instances = _rebuilt(tmp_path, [source])
    other = _other_version(source)
    region.hold(other)

    with pytest.raises(ArchiveRefused) as refused:
        _archiver(region).store(instances, "SITE-A")
    why = refused.value.reasons[instances[0].sop_instance_uid]
    assert "already holds this SOP Instance UID with other bytes" in why, why
    assert hashlib.sha256(other).hexdigest() in why and instances[0].sha256 in why
    assert region.held[instances[0].sop_instance_uid][2] == other  # kept


def test_a_read_back_that_fails_refuses_this_round_only(
        tmp_path: Path, region: RefusingArchive) -> None:
    instances = _rebuilt(tmp_path, sorted(MR_DIR.glob("*.dcm"))[5:6])
    uid = region.hold(instances[0].path.read_bytes())
    region.wado_failures[uid] = 1
    archiver = _archiver(region)

    with pytest.raises(ArchiveRefused) as refused:
        archiver.store(instances, "SITE-A")
    assert "reading it back (WADO-RS) answered 503" in refused.value.reasons[uid]
    archiver.store(instances, "SITE-A")
