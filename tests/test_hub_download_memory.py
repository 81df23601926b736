"""The hub's bucketed download of a large study from its embedded archive costs bounded
memory (invariant 8), and still sends every instance byte for byte.

Found in review (2026-12-04): the download read every index row of the study (about 1.2 kB
each in Python) before packing the first bucket, per download request: peak RSS of
`pas hub run` grew with the study. It now keeps the row ids (8 bytes each) and reads the rows
500 at a time as they are packed.
"""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import closing
from pathlib import Path

from pydicom.uid import generate_uid

from appliance.transfer.download import HubDownloads
from tests.support.hub import HubProcess, client, enroll, pack_items, ship
from tests.support.objects import tiny_ct
from tests.test_ingest_spill import peak_rss_mb
from tests.test_serving_memory import _reset_peak

INSTANCES = 50_000


def _copies(archive: Path, sop_uid: str, count: int) -> list[str]:
    """``count`` more index rows of the archive's one instance, under new SOP Instance UIDs
    (the same file: only the index matters to the download's plan)."""
    prefix = generate_uid()[:40]
    uids = [f"{prefix}.{n}" for n in range(count)]
    with closing(sqlite3.connect(archive)) as conn, conn:
        columns = ("series_fk, study_fk, sop_class_uid, transfer_syntax_uid, instance_number, "
                   "path, size, sha256, received_at, routed_at, confirmed_at")
        conn.executemany(
            f"INSERT INTO instances (sop_instance_uid, {columns}) SELECT ?, {columns} "
            "FROM instances WHERE sop_instance_uid = ?", ((uid, sop_uid) for uid in uids))
    return uids


def test_download_of_a_study_of_50000_instances_reads_its_rows_as_it_packs(
        tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub").init().start()
    try:
        site = enroll(hub, tmp_path / "site", "SITE-M")
        ds = tiny_ct()
        ds.save_as(tmp_path / "one.dcm", enforce_file_format=True)
        study, real = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        shipment = ship(pack_items([tmp_path / "one.dcm"]), site.hub_transfer_key,
                        study_uid=study)
        with client(site) as http:
            assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
            assert set(shipment.put_all(http)) == {201}
            assert http.post(shipment.url + "/commit").status_code == 200
        hub.stop()
        uids = _copies(tmp_path / "hub" / "archive" / "pas.sqlite", real, INSTANCES)
        hub.start()
        assert hub.proc is not None
        downloads = HubDownloads(site.url, site.ssl_context())
        try:
            # Warm-up (modules, the threads' database connections): one instance, the site
            # saying it has every other.
            got: dict[str, str] = {}
            downloads.fetch(study, lambda uid, data: got.setdefault(uid, ""), have=set(uids))
            assert list(got) == [real]
            got.clear()
            _reset_peak(hub.proc.pid)
            before = peak_rss_mb(hub.proc.pid)
            result = downloads.fetch(
                study, lambda uid, data: got.setdefault(uid, hashlib.sha256(data).hexdigest()))
            growth = peak_rss_mb(hub.proc.pid) - before
        finally:
            downloads.close()
        print(f"bucketed download of {INSTANCES + 1} instances from the embedded archive: "
              f"pas hub run peak RSS +{growth:.1f} MB")
        # Every instance once, the archive's bytes (the one file) for each.
        assert result.instances == len(got) == INSTANCES + 1
        assert set(got) == {real, *uids}
        assert set(got.values()) == {shipment.originals[real]}
        # Every row read first: +82 MB. What is left is the bucket pipeline (a 4 MiB bucket of
        # these 860-byte instances plans thousands of them), not the study: +34 MB for
        # 50,001 instances, +28 MB for 100,001.
        assert growth < 50, growth
    finally:
        hub.stop()
