"""Temporary copies on the spool (a transcoded copy, an inflated dataset) reserve their room
before they write it, and the reservation is what the free-space floor and the quota count.

Found in review (2026-12-04): the floor check of a temp copy compared its room with the
disk's free space only, which does not yet show what copies in flight were granted and have
not written: two copies started together could each see room for one. And a deflated
object's inflated temp file (appliance/store/inflate.py, once transcode.py's) asked the
quota for its first 16 MB only; past that it checked the floor alone, so a 40 MiB inflated
dataset took the spool past a 24 MiB quota before the copy was refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from appliance.store.spool import Spool, SpoolFull
from appliance.store.transcode import write_transcoded
from tests.test_ingest_deflated import deflated_object

EXPLICIT = "1.2.840.10008.1.2.1"


def test_copies_in_flight_count_against_the_free_space_floor(tmp_path: Path) -> None:
    """Room for one 1 GiB copy above the floor and not two: the second is refused while the
    first is in flight (nothing written yet: the disk shows all of it free), and fits once
    the first is let go. Growing a copy asks the same of its added room."""
    room = 1 << 30
    free = shutil.disk_usage(tmp_path).free
    assert free > 2 * room, "this test needs 2 GiB free (nothing is written)"
    spool = Spool(tmp_path / "spool", fsync=False, min_free_bytes=free - room - room // 2)
    first, fd = spool.open_temp(room)
    os.close(fd)
    with pytest.raises(SpoolFull, match=rf"{room} needed for a temporary copy, {room} "
                                        r"promised to copies being written"):
        spool.open_temp(room)
    spool.remove_temp(first)
    second, fd = spool.open_temp(room)
    os.close(fd)
    with pytest.raises(SpoolFull, match="promised to copies being written"):
        spool.grow_temp(second, room)
    assert spool._copies == {second: room}  # the refused growth granted nothing
    spool.remove_temp(second)
    assert not spool._copies


class _Watching(Spool):
    """Records the bytes in temp files each time room is asked for (the inflated file as
    it grows, then the copy)."""

    def __init__(self, root: Path, quota: int):
        super().__init__(root, fsync=False, quota_bytes=quota, held_bytes=lambda: 0)
        self.seen: list[int] = []

    def check_temp_room(self, room: int) -> None:
        self.seen.append(sum(p.stat().st_size for p in self.tmp.glob("*.part")))
        super().check_temp_room(room)


def test_an_inflated_dataset_counts_whole_against_the_quota(tmp_path: Path) -> None:
    """A 40 MiB inflated dataset under a 24 MiB quota: refused as it grows past what the
    quota leaves (it reached 40 MiB on the disk first), nothing left; under a quota with room
    for it and the copy, the copy is made and both reservations go with the files."""
    source = deflated_object(tmp_path / "deflated.dcm", frames=20)
    quota = 24 << 20
    spool = _Watching(tmp_path / "spool", quota)
    with pytest.raises(SpoolFull, match="spool quota reached"):
        write_transcoded(spool, source, EXPLICIT)
    assert max(spool.seen) <= quota, [n >> 20 for n in spool.seen]
    assert not any(p.stat().st_size for p in spool.tmp.glob("*.part"))
    assert not spool._copies

    roomy = _Watching(tmp_path / "roomy", 128 << 20)
    copy = write_transcoded(roomy, source, EXPLICIT)
    assert copy.stat().st_size > 40 << 20
    assert list(roomy._copies) == [copy]  # the inflated file's room went with it
    roomy.remove_temp(copy)
    assert not roomy._copies
