"""A large prior comes down the bucketed download in bounded memory (invariant 8), and is
filed byte for byte.

Found in review (2026-12-03): the site rebuilt an instance split across buckets in a
bytearray of its size, then copied it to bytes for the Receiver: a 300 MB instance took the
downloading `pas run` from 108 to 732 MB (+624 MB). It is now rebuilt in a spool temp file,
read back once for its SHA-256, and filed from there (+25 MB for the same instance).
"""

from __future__ import annotations

from pathlib import Path

from tests.support.hub import HubProcess, enroll
from tests.support.peers import PasProcess, read_rows, storescu, wait_for
from tests.test_ingest_spill import _big_secondary_capture, _sha256, peak_rss_mb
from tests.test_serving_memory import _reset_peak

MEGABYTES = 100  # enough to tell: it cost twice its size; the time of an upload and a download


def test_a_100_mb_prior_is_rebuilt_on_disk_not_in_memory(tmp_path: Path) -> None:
    big = _big_secondary_capture(tmp_path / "big.dcm", MEGABYTES)
    hub = HubProcess(tmp_path / "hub").init()
    hub.start()
    sender = receiver = None
    try:
        # The region gets it the usual way: an appliance's upload, packed by zstd alone (its
        # "fast" level). At "default" each band of these incompressible pixels is JPEG-LS
        # encoded, decoded to check, then found not worth it: 25 s of upload on a loaded
        # machine, 1.5 s so. What is measured is the download (the hub packs it at "default"
        # whatever a site sets).
        enroll(hub, tmp_path / "site-a", "SITE-A")
        sender = PasProcess(tmp_path / "site-a", {
            "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_STORAGE__FSYNC": "false",
            "PAS_HUB__PACK_LEVEL": "fast",
            "PAS_STUDY__STABLE_AFTER_S": "1", "PAS_PREFETCH__ON_ARRIVAL": "false",
            "PAS_OPS__HEARTBEAT": "false"}).start()
        storescu([big], sender.port)
        wait_for(lambda: read_rows(sender.home / "pas.sqlite",  # type: ignore[union-attr]
                                   "SELECT count(*) AS n FROM instances WHERE confirmed_at "
                                   "IS NOT NULL")[0]["n"] == 1, 120, interval=0.3,
                 what="the upload confirmed")
        sender.stop()

        # Another site fetches it as a prior: buckets of 4 MiB, so it comes in pieces.
        enroll(hub, tmp_path / "site-b", "SITE-B")
        receiver = PasProcess(tmp_path / "site-b", {
            "PAS_STORAGE__FSYNC": "false", "PAS_PREFETCH__CHECK_INTERVAL_S": "0.2",
            "PAS_PREFETCH__DOWNLOAD_BUCKET_KB": "4096", "PAS_OPS__HEARTBEAT": "false",
            "PAS_DICOM__SPILL_ABOVE_MB": "32"}).start()
        assert receiver.proc is not None
        _reset_peak(receiver.proc.pid)
        before = peak_rss_mb(receiver.proc.pid)
        receiver.cli("prefetch", "patient", "SPILL1")
        # Awaited in the index (the count `pas status` gives), then asked of `pas status` once:
        # a `pas status` every 0.3 s (~60 ms each, some 30 of them) took CPU from the download
        # on the 2-core machine.
        wait_for(lambda: read_rows(receiver.home / "pas.sqlite",  # type: ignore[union-attr]
                                   "SELECT instances FROM instance_totals")[0]["instances"]
                 == 1, 120, interval=0.3, what="the prior filed")
        growth = peak_rss_mb(receiver.proc.pid) - before
        assert receiver.status()["instances"] == 1
        print(f"bucketed download of a {MEGABYTES} MB instance: peak RSS +{growth:.0f} MB")
        assert growth < 64, growth  # the spill threshold and a few buckets; was 2 x 100 MB

        # The region's file, byte for byte, as site A stored it.
        (filed,) = list((receiver.home / "spool").rglob("??/*.dcm"))
        (sent,) = list((tmp_path / "site-a" / "spool").rglob("??/*.dcm"))
        assert _sha256(filed) == filed.stem == sent.stem
        assert not [p for p in (receiver.home / "spool" / "tmp").glob("*")
                    if p.stat().st_size]
    finally:
        for pas in (sender, receiver):
            if pas is not None:
                pas.stop()
        hub.kill()
