"""`make bench-qr`: C-FIND latency on a large index, C-MOVE rate, PAS next to Orthanc.

1. C-FIND study level on an index of N synthesized studies (default 100,000; rows inserted
   through the store layer, every instance pointing at one real CT file so that start-up
   recovery finds them whole): p50/p95 per query shape, over one association from a
   pynetdicom SCU (one request at a time, the time from C-FIND-RQ to the final response).
2. The same query shapes against PAS and Orthanc each holding only the real CT and MR sets,
   and two more there: every study (study level) and every image of the MR study (520).
3. C-MOVE of the CT set (one C-MOVE per study, one association) and the MR set (one study)
   into a DCMTK storescp, from PAS and from Orthanc in the same run: instances/s, MB/s.
4. C-FIND with the region asked (``query_region``), link up and link down.
Targets: C-FIND p95 <= 50 ms on the large index; C-MOVE >= Orthanc and >= 150 CT images/s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from appliance.dicomnet.nodelay import no_delay  # noqa: E402
from appliance.ingest.receive import Receiver  # noqa: E402
from appliance.serving.qr_associations import reactor_takes_no_messages  # noqa: E402
from appliance.store import index  # noqa: E402
from appliance.store import query as store_query  # noqa: E402
from appliance.store.db import Database  # noqa: E402
from appliance.store.spool import Spool  # noqa: E402
from tests.support.peers import (  # noqa: E402
    CT_DIR,
    MR_DIR,
    NetNamespace,
    Orthanc,
    PasProcess,
    StoreSCP,
    storescu,
    wait_for,
)

SURNAMES = ["MARTIN", "BERNARD", "DUBOIS", "THOMAS", "ROBERT", "RICHARD", "PETIT", "DURAND",
            "LEROY", "MOREAU", "SIMON", "LAURENT", "LEFEBVRE", "MICHEL", "GARCIA", "DAVID",
            "BERTRAND", "ROUX", "VINCENT", "FOURNIER", "MOREL", "GIRARD", "ANDRE", "MERCIER"]
GIVEN = ["JEAN", "MARIE", "PIERRE", "ANNE", "LOUIS", "CLAIRE", "PAUL", "JULIE", "LUC", "EMMA"]
MODALITIES = ["CT", "CT", "MR", "CR", "DX", "US", "MG", "PT"]


def synthesize(home: Path, studies: int, seed: int = 7) -> dict[str, Any]:
    """Fill a PAS home with ``studies`` synthetic studies through appliance.store.index."""
    rng = random.Random(seed)
    db = Database(home / "pas.sqlite")
    spool = Spool(home / "spool", fsync=False)
    real = Receiver(db, spool).receive_file(next(iter(sorted(CT_DIR.glob("*.dcm")))).read_bytes())
    row = index.instance_by_uid(db, real.sop_instance_uid)
    assert row is not None
    stored = index.StoredFile(row["path"], row["size"], row["sha256"])
    patients = max(1, studies // 3)
    sample: dict[str, Any] = {"ids": [], "dates": [], "accessions": []}
    batch = 5000
    for start in range(0, studies, batch):
        with db.transaction():  # one commit per batch: record_instance joins it
            for n in range(start, min(start + batch, studies)):
                patient = rng.randrange(patients)
                date = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randrange(9000))
                modality = rng.choice(MODALITIES)
                record = index.InstanceRecord(
                    sop_instance_uid=f"2.25.1{n:09d}.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    study_uid=f"2.25.1{n:09d}.1", series_uid=f"2.25.1{n:09d}.2",
                    patient_id=f"P{patient:07d}",
                    patient_name=f"{SURNAMES[patient % len(SURNAMES)]}^"
                                 f"{GIVEN[(patient // 24) % len(GIVEN)]}{patient}",
                    birth_date="19600101", sex="F" if patient % 2 else "M",
                    study_date=date.strftime("%Y%m%d"), study_time="101500",
                    accession_number=f"ACC{n:08d}", study_description="SYNTHETIC",
                    series_number=1, modality=modality, instance_number=1)
                index.record_instance(db, record, stored, origin="local")
                if n % 997 == 0:
                    sample["ids"].append(record.patient_id)
                    sample["dates"].append(record.study_date)
                    sample["accessions"].append(record.accession_number)
    # Routed long ago, as in a cache that has been running: otherwise the daemon's router
    # spends the first minute routing every synthetic study, beside the queries measured.
    with db.transaction() as conn:
        conn.execute("UPDATE instances SET routed_at = received_at WHERE routed_at IS NULL")
    db.close()
    return sample


def query_shapes(sample: dict[str, Any]) -> dict[str, Callable[[int], dict[str, str]]]:
    """Name -> (i -> identifier keys): the queries a viewer's worklist and search send."""
    ids, dates, accs = sample["ids"], sample["dates"], sample["accessions"]

    def week(i: int) -> str:
        day = datetime.datetime.strptime(dates[i % len(dates)], "%Y%m%d").date()
        return f"{day:%Y%m%d}-{day + datetime.timedelta(days=6):%Y%m%d}"

    return {
        "PatientID exact": lambda i: {"PatientID": ids[i % len(ids)]},
        "AccessionNumber": lambda i: {"AccessionNumber": accs[i % len(accs)]},
        "StudyDate one day": lambda i: {"StudyDate": dates[i % len(dates)]},
        "StudyDate week + CT": lambda i: {"StudyDate": week(i), "ModalitiesInStudy": "CT"},
        "PatientName prefix*": lambda i: {"PatientName": f"{SURNAMES[i % 24]}^JEAN1{i % 10}*"},
    }


RETURN_KEYS = {"StudyInstanceUID": "", "PatientName": "", "PatientID": "", "StudyDate": "",
               "AccessionNumber": "", "ModalitiesInStudy": "", "StudyDescription": "",
               "NumberOfStudyRelatedInstances": ""}


def _no_delay(event: evt.Event) -> None:
    """The benchmark's own associations without Nagle, as PAS's (dicomnet/nodelay.py)."""
    no_delay(event.assoc.dul.socket.socket)


def time_finds(host: str, port: int, called: str, shapes: dict[str, Callable[[int], dict]],
               repeat: int) -> dict[str, tuple[list[float], int]]:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(host, port, ae_title=called,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    assert assoc.is_established, f"association with {called} refused"
    # This SCU never receives requests; without this pynetdicom's reactor can take a pending
    # response off the queue (stale pause flag) and a query then looks one match short.
    reactor_takes_no_messages(assoc)
    results: dict[str, tuple[list[float], int]] = {}
    try:
        for name, make in shapes.items():
            timings, matches = [], 0
            for i in range(repeat):
                ds = Dataset()
                keys = make(i)
                # A shape may name its own level and keys (an IMAGE-level search of a
                # study); a study-level one adds a worklist's return keys.
                ds.QueryRetrieveLevel = keys.pop("QueryRetrieveLevel", "STUDY")
                base = RETURN_KEYS if ds.QueryRetrieveLevel == "STUDY" else {}
                for key, value in {**base, **keys}.items():
                    setattr(ds, key, value)
                started = time.perf_counter()
                for status, _identifier in assoc.send_c_find(
                        ds, StudyRootQueryRetrieveInformationModelFind):
                    if status and status.Status in (0xFF00, 0xFF01):
                        matches += 1
                    elif status is None or status.Status != 0:
                        raise RuntimeError(f"C-FIND failed: {status}")
                timings.append(time.perf_counter() - started)
            results[name] = (timings, matches)
    finally:
        assoc.release()
    return results


def time_findscu(host: str, port: int, called: str, keys: dict[str, str],
                 repeat: int) -> float:
    """Milliseconds per query with DCMTK findscu as the viewer (TCP_NODELAY=1): one findscu
    sending the query ``repeat + 1`` times on one association, less one sending it once
    (the process and the association). pynetdicom as the viewer spends ~0.45 ms of its own
    decoding each answer, more than PAS now spends sending it: a large answer's time was
    mostly the viewer's."""
    args = ["findscu", "-S", "-aet", "BENCH", "-aec", called]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}"]

    def run(times: int) -> float:
        started = time.perf_counter()
        subprocess.run([*args, "--repeat", str(times), host, str(port)], check=True,
                       env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True)
        return time.perf_counter() - started

    return (run(repeat + 1) - run(1)) / repeat * 1000


def time_sql(home: Path, shapes: dict[str, Callable[[int], dict]],
             repeat: int) -> dict[str, list[float]]:
    """The same queries straight on appliance.store.query (no DICOM, no audit write)."""
    db = Database(home / "pas.sqlite")
    timings: dict[str, list[float]] = {}
    try:
        for name, make in shapes.items():
            timings[name] = []
            for i in range(repeat):
                started = time.perf_counter()
                list(store_query.find(db, "STUDY", {**RETURN_KEYS, **make(i)}))
                timings[name].append(time.perf_counter() - started)
    finally:
        db.close()
    return timings


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def time_moves(host: str, port: int, called: str, study_uids: list[str], dest: StoreSCP,
               expected: int, as_list: bool = False) -> tuple[float, int, int]:
    """(seconds, instances, bytes) for one C-MOVE per study over one association, or one
    C-MOVE naming every study (a UID list) when ``as_list``."""
    if as_list:
        study_uids = ["\\".join(study_uids)]
    for old in dest.files():
        old.unlink()
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(host, port, ae_title=called,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    assert assoc.is_established
    started = time.perf_counter()
    try:
        for uid in study_uids:
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = uid
            final = None
            for status, _ in assoc.send_c_move(ds, dest.ae_title,
                                               StudyRootQueryRetrieveInformationModelMove):
                final = status
            if final is None or final.get("Status") != 0:
                raise RuntimeError(f"C-MOVE of {uid} from {called} ended with {final}")
    finally:
        assoc.release()
    elapsed = time.perf_counter() - started
    files = wait_for(lambda: (f := dest.files()) and len(f) >= expected and f, 60,
                     what=f"{expected} files from {called}")
    return elapsed, len(files), sum(f.stat().st_size for f in files)


def wan_down_finds(root: Path, region: Orthanc, ns: NetNamespace, repeat: int) -> None:
    """C-FIND with ``serving.query_region = true`` while the region's link is down (packets
    vanish): the answer must come from local data, bounded by region_query_timeout_s."""
    pas = PasProcess(root / "pas-wan", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
        "PAS_PREFETCH__DICOMWEB_URL": region.dicomweb, "PAS_SERVING__QUERY_REGION": "true",
        "PAS_PREFETCH__ALLOW_CLEARTEXT": "true",  # Orthanc's http:// in its namespace
        "PAS_SERVING__REGION_QUERY_TIMEOUT_S": "0.5"}).start()
    try:
        storescu(CT_DIR, pas.port)
        shape = {"PatientID exact": lambda i: {"PatientID": "A002304"}}
        up = time_finds("127.0.0.1", pas.port, "PAS", shape, repeat)["PatientID exact"][0]
        subprocess.run(["ip", "-n", ns.name, "link", "set", ns.inner_if, "down"], check=True)
        try:
            down = time_finds("127.0.0.1", pas.port, "PAS", shape, repeat)["PatientID exact"][0]
        finally:
            subprocess.run(["ip", "-n", ns.name, "link", "set", ns.inner_if, "up"], check=True)
    finally:
        pas.stop()
    print("\n## C-FIND with query_region = true (region_query_timeout_s = 0.5)\n")
    print("| region link | p50 ms | p95 ms | max ms |")
    print("|---|---|---|---|")
    for label, timings in (("up (local + regional answers)", up),
                           ("down (packets dropped; local answers only)", down)):
        print(f"| {label} | {pct(timings, .5):.1f} | {pct(timings, .95):.1f} | "
              f"{max(timings) * 1000:.1f} |")


def studies_of(folder: Path) -> tuple[list[str], int]:
    headers = [dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    return (sorted({str(h.StudyInstanceUID) for h in headers}),
            len({str(h.SOPInstanceUID) for h in headers}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=40, help="queries per shape")
    args = parser.parse_args()
    print(f"# bench-qr {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench-qr-") as tmp:
        root = Path(tmp)
        # -- 1. the large index ---------------------------------------------------------
        started = time.perf_counter()
        sample = synthesize(root / "big", args.studies)
        print(f"synthesized {args.studies} studies in {time.perf_counter() - started:.1f} s")
        # Synthetic rows are never routed: keep the router's pass (every 0.2 s in PasProcess)
        # from turning 100,000 "new" studies into routing work while queries are timed.
        big = PasProcess(root / "big", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_PREFETCH__ENABLED": "false",
                                        "PAS_STUDY__STABLE_AFTER_S": "1000000",
                                        "PAS_STUDY__CHECK_INTERVAL_S": "3600",
                                        "PAS_CACHE__SCRUB_MB_PER_S": "0"}).start(120)
        shapes = query_shapes(sample)
        try:
            timed = time_finds("127.0.0.1", big.port, "PAS", shapes, args.repeat)
        finally:
            big.stop()
        sql = time_sql(root / "big", shapes, args.repeat)
        print(f"\n## C-FIND, study level, {args.studies} studies in the index "
              f"({args.repeat} queries per shape, one association)\n")
        print("| query | C-FIND p50 ms | C-FIND p95 ms | SQL only p50 ms | SQL only p95 ms | "
              "matches/query |")
        print("|---|---|---|---|---|---|")
        everything: list[float] = []
        for name, (timings, matches) in timed.items():
            everything += timings
            print(f"| {name} | {pct(timings, .5):.1f} | {pct(timings, .95):.1f} | "
                  f"{pct(sql[name], .5):.1f} | {pct(sql[name], .95):.1f} | "
                  f"{matches / len(timings):.1f} |")
        print(f"| all shapes | {pct(everything, .5):.1f} | {pct(everything, .95):.1f} | | | |")

        # -- 2./3. PAS and Orthanc on the real sets -------------------------------------
        ns = NetNamespace("bqr").create()
        scp = StoreSCP(root / "scp").start()
        orthanc = Orthanc(root / "orthanc", ns=ns, modalities={
            "STORESCP": ["STORESCP", ns.outer_address, scp.port],
            "BENCH": ["BENCH", ns.outer_address, scp.port]})
        pas_env = {
            "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
            "PAS_SERVING__MOVE_DESTINATIONS":
                f'[{{title = "STORESCP", host = "127.0.0.1", port = {scp.port}}}]'}
        pas = PasProcess(root / "pas", pas_env)
        try:
            orthanc.start()
            pas.start()
            for folder in (CT_DIR, MR_DIR):
                storescu(folder, pas.port)
                storescu(folder, orthanc.dicom_port, host=orthanc.host, called="ORTHANC")
            [mr_study], _ = studies_of(MR_DIR)
            real_shapes = {
                "PatientID exact": lambda i: {"PatientID": "A002304"},
                "StudyDate range": lambda i: {"StudyDate": "19000101-19001231"},
                "PatientName prefix*": lambda i: {"PatientName": "A0*"},
                "STUDY, every study": lambda i: {},
                # A viewer opening the MR study: every image of its 520 (a few series).
                "IMAGE, the MR study": lambda i: {
                    "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": mr_study,
                    "SeriesInstanceUID": "", "SOPInstanceUID": "", "SOPClassUID": "",
                    "InstanceNumber": "", "SeriesNumber": ""},
            }
            pas_find = time_finds("127.0.0.1", pas.port, "PAS", real_shapes, args.repeat)
            orthanc_find = time_finds(orthanc.host, orthanc.dicom_port, "ORTHANC", real_shapes,
                                      args.repeat)
            print("\n## C-FIND on the real sets (21 studies), PAS vs Orthanc, same run\n")
            print("| query | PAS p50 ms | PAS p95 ms | Orthanc p50 ms | Orthanc p95 ms | "
                  "Orthanc p50 / PAS p50 | matches PAS / Orthanc |")
            print("|---|---|---|---|---|---|---|")
            for name in real_shapes:
                p, o = pas_find[name][0], orthanc_find[name][0]
                print(f"| {name} | {pct(p, .5):.1f} | {pct(p, .95):.1f} | {pct(o, .5):.1f} | "
                      f"{pct(o, .95):.1f} | {pct(o, .5) / pct(p, .5):.2f}x | "
                      f"{pas_find[name][1] // args.repeat} / "
                      f"{orthanc_find[name][1] // args.repeat} |")

            print("\n## C-FIND on the real sets, DCMTK findscu as the viewer, same run\n")
            print("| query | PAS ms/query | Orthanc ms/query | Orthanc / PAS |")
            print("|---|---|---|---|")
            for name, keys in (
                    ("STUDY, every study", {"QueryRetrieveLevel": "STUDY",
                                            **RETURN_KEYS}),
                    ("IMAGE, the MR study", real_shapes["IMAGE, the MR study"](0))):
                p_ms = time_findscu("127.0.0.1", pas.port, "PAS", keys, args.repeat)
                o_ms = time_findscu(orthanc.host, orthanc.dicom_port, "ORTHANC", keys,
                                    args.repeat)
                print(f"| {name} | {p_ms:.1f} | {o_ms:.1f} | {o_ms / p_ms:.2f}x |")

            print("\n## C-MOVE into DCMTK storescp (one C-MOVE per study, one association)\n")
            print("| set | peer | instances | seconds | instances/s | MB/s | PAS / Orthanc |")
            print("|---|---|---|---|---|---|---|")
            for label, folder in (("CT (20 studies)", CT_DIR), ("MR (1 study)", MR_DIR)):
                uids, count = studies_of(folder)
                o_s, o_n, o_b = time_moves(orthanc.host, orthanc.dicom_port, "ORTHANC", uids,
                                           scp, count)
                p_s, p_n, p_b = time_moves("127.0.0.1", pas.port, "PAS", uids, scp, count)
                ratio = (p_n / p_s) / (o_n / o_s)
                mr_orthanc = o_n / o_s  # the last set is MR: the per-image-Pending row below
                print(f"| {label} | Orthanc | {o_n} | {o_s:.2f} | {o_n / o_s:.0f} | "
                      f"{o_b / o_s / 1e6:.1f} | |")
                print(f"| {label} | PAS | {p_n} | {p_s:.2f} | {p_n / p_s:.0f} | "
                      f"{p_b / p_s / 1e6:.1f} | {ratio:.2f}x |")
            # The CT set as one C-MOVE (its 20 study UIDs as a list): one sub-association.
            uids, count = studies_of(CT_DIR)
            p_s, p_n, p_b = time_moves("127.0.0.1", pas.port, "PAS", uids, scp, count, True)
            try:
                o_s, o_n, o_b = time_moves(orthanc.host, orthanc.dicom_port, "ORTHANC", uids,
                                           scp, count, True)
                orthanc_row = (f"| CT, one C-MOVE (UID list) | Orthanc | {o_n} | {o_s:.2f} | "
                               f"{o_n / o_s:.0f} | {o_b / o_s / 1e6:.1f} | |")
                ratio_text = f"{(p_n / p_s) / (o_n / o_s):.2f}x"
            except (RuntimeError, TimeoutError) as exc:
                orthanc_row = f"| CT, one C-MOVE (UID list) | Orthanc | failed: {exc} | | | | |"
                ratio_text = ""
            print(orthanc_row)
            print(f"| CT, one C-MOVE (UID list) | PAS | {p_n} | {p_s:.2f} | {p_n / p_s:.0f} | "
                  f"{p_b / p_s / 1e6:.1f} | {ratio_text} |")
            # PAS sends a Pending response at most every 0.1 s (serving.
            # retrieve_pending_interval_s); Orthanc sends one per image. The same MR move
            # with one per image too, on the same data:
            pas.stop()
            pas = PasProcess(root / "pas", {**pas_env,
                                            "PAS_SERVING__RETRIEVE_PENDING_INTERVAL_S": "0"})
            pas.start()
            uids, count = studies_of(MR_DIR)
            p_s, p_n, p_b = time_moves("127.0.0.1", pas.port, "PAS", uids, scp, count)
            print(f"| MR (1 study), a Pending per image | PAS | {p_n} | {p_s:.2f} | "
                  f"{p_n / p_s:.0f} | {p_b / p_s / 1e6:.1f} | {(p_n / p_s) / mr_orthanc:.2f}x |")
            wan_down_finds(root, orthanc, ns, args.repeat)
        finally:
            pas.stop()
            orthanc.stop()
            scp.stop()
            ns.delete()


if __name__ == "__main__":
    main()
