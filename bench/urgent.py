"""`make bench-urgent`: how long after an emergency CT's last slice the region holds the
study, with urgent batches (``study.urgent_batch_s``) and waiting for stability.

DESIGN.md: "Sending need not wait for the study to be stable: buckets can leave while the
modality is still sending ... the difference between at the region seconds after the last
slice and a minute later". The study is the real MR set (520 instances, 45 MB), sent by
DCMTK storescu (TCP_NODELAY=1) as ``CT_URG`` in ``--chunks`` pieces, one every
``--every-s`` seconds (a scanner sending images as it reconstructs them), to a real
``pas run`` enrolled to a real ``pas hub run`` (embedded archive) on this machine, the link
held to ``--mbps`` by PAS's own cap (``hub.max_mbps``: the WAN's bottleneck, without the
netns of bench/wan). Two runs in the same invocation, the same data and link:

- urgent batches: ``study.urgent_batch_s`` 5 (the default), ``stable_after_s`` 60;
- waiting for stability: ``urgent_batch_s`` 0, ``stable_after_s`` 60 (every study before
  this change; Orthanc's StableAge works the same way).

The time is from the end of the last storescu (the last slice acknowledged) to the moment
every instance is confirmed by the hub's receipts (polled in PAS's database every 0.1 s);
every instance is checked to be held by the hub's archive with the SHA-256 PAS stored.
Owns nothing but its printout.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.hub import HubProcess, enroll  # noqa: E402
from tests.support.peers import MR_DIR, PasProcess, storescu, wait_for  # noqa: E402
from tests.support.peers import read_rows as rows  # noqa: E402

RULE = textwrap.dedent("""
    [[routing.rules]]
    name = "emergency CT"
    match = { calling_ae = "^CT_URG$" }
    destinations = ["hub"]
    priority = "urgent"
    """)


def run(hub: HubProcess, scratch: Path, name: str, files: list[Path], chunks: int,
        every_s: float, mbps: float, batch_s: float) -> dict[str, float]:
    home = scratch / name
    enroll(hub, home, f"BENCH-{name.upper()}")
    config = scratch / f"{name}.toml"
    config.write_text(RULE)
    pas = PasProcess(home, {"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                            "PAS_PREFETCH__ON_ARRIVAL": "false",
                            "PAS_STUDY__STABLE_AFTER_S": "60",
                            "PAS_STUDY__URGENT_BATCH_S": str(batch_s),
                            "PAS_HUB__MAX_MBPS": str(mbps)}).start()
    db = home / "pas.sqlite"
    try:
        size = -(-len(files) // chunks)
        start = time.monotonic()
        for index in range(chunks):
            piece = files[index * size:(index + 1) * size]
            if piece:
                storescu(piece, pas.port, calling="CT_URG")
            if index < chunks - 1:
                time.sleep(max(0.0, start + (index + 1) * every_s - time.monotonic()))
        last_slice = time.monotonic()

        def confirmed() -> bool:
            row = rows(db, "SELECT count(*) AS n, count(confirmed_at) AS c FROM instances")[0]
            return bool(row["n"] == row["c"] == len(files))

        wait_for(confirmed, 900, interval=0.1, what="every instance confirmed by the hub")
        at_region = time.monotonic()
        stored = {r["sop_instance_uid"]: r["sha256"]
                  for r in rows(db, "SELECT sop_instance_uid, sha256 FROM instances")}
        archived = {r["sop_instance_uid"]: r["sha256"] for r in rows(
            hub.home / "archive" / "pas.sqlite",
            "SELECT sop_instance_uid, sha256 FROM instances WHERE is_current = 1")}
        if any(archived.get(uid) != sha for uid, sha in stored.items()):
            raise RuntimeError("the hub's archive does not hold every instance bit-exact")
        transfers = len(rows(db, "SELECT id FROM jobs WHERE destination = 'hub'"))
        return {"sending_s": last_slice - start, "after_last_s": at_region - last_slice,
                "transfers": transfers}
    finally:
        pas.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--every-s", type=float, default=2.0)
    parser.add_argument("--mbps", type=float, default=20.0)
    args = parser.parse_args()
    files = sorted(MR_DIR.glob("*.dcm"))
    scratch = Path(tempfile.mkdtemp(prefix="bench-urgent-"))
    hub = HubProcess(scratch / "hub").init().start()
    try:
        urgent = run(hub, scratch, "urgent", files, args.chunks, args.every_s, args.mbps, 5.0)
        stable = run(hub, scratch, "stable", files, args.chunks, args.every_s, args.mbps, 0.0)
    finally:
        hub.kill()
    print(f"\nbench-urgent {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
          f"{platform.node()}: MR set ({len(files)} instances) sent in {args.chunks} pieces "
          f"every {args.every_s} s, hub.max_mbps {args.mbps}, loopback")
    print(f"{'routing':34} {'sending s':>9} {'last slice -> region s':>23} {'transfers':>9}")
    for label, result in (("urgent batches (urgent_batch_s 5)", urgent),
                          ("waiting for stability (60 s)", stable)):
        print(f"{label:34} {result['sending_s']:9.1f} {result['after_last_s']:23.1f} "
              f"{int(result['transfers']):9d}")
    ratio = stable["after_last_s"] / urgent["after_last_s"]
    print(f"ratio: the region holds the study {ratio:.1f}x sooner after the last slice with "
          "urgent batches")


if __name__ == "__main__":
    main()
