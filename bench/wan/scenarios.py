"""The WAN benchmark's PAS-only scenarios: outage, throughput cap, memory on a 2 GB study.

Owns: making synthetic-but-real studies (copies of the real CT files with new Study, Series and
SOP Instance UIDs, pixel data untouched), and three measurements through the real appliance,
hub and regional Orthanc of ``bench/wan/pas.py``:

- outage: the CT set on the 20 Mbit/s link, the link cut for 30 s once a third of the expected
  bytes crossed; completes without intervention? bucket bytes sent again (the appliance's
  ``pas_upload_put_bytes`` minus the hub's ``bytes_stored``) against the PUTs in flight at the
  cut (the appliance's ``pas_upload_inflight_bytes``, read as the link goes down);
- cap: ``hub.max_mbps`` on the 20 Mbit/s link; the shaper's per-second counts give the rate over
  the steadiest 60 s window against the cap;
- memory: a ~2 GB study on the 100 Mbit/s link; the daemon's peak RSS (VmHWM).

Touches nothing outside its scratch folder and the link's namespaces.

    python -m bench.wan.scenarios [outage,cap,memory] [--big-gb 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from bench.wan.link import WanLink
from bench.wan.pas import run_pas
from bench.wan.peers import Dataset
from bench.wan.run import LINKS, pas_env
from tests.support.peers import CT_DIR


def make_study(target_bytes: int, folder: Path) -> Dataset:
    """Copies of the real CT files as ONE new study (new UIDs, same pixels) up to ``target``."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(CT_DIR.glob("*.dcm"))
    study_uid = generate_uid()
    series_uids: dict[str, str] = {}
    written = 0
    number = 0
    while written < target_bytes:
        source = sources[number % len(sources)]
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID = study_uid
        key = f"{source.name.split('-')[0]}-{number // len(sources)}"
        ds.SeriesInstanceUID = series_uids.setdefault(key, generate_uid())
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = "PASBENCHBIG"
        path = folder / f"{number:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written += path.stat().st_size
        number += 1
    return Dataset.load(f"synthetic CT {written / 1e9:.2f} GB", folder)


@dataclasses.dataclass
class Sampler:
    """Samples the shaper's site -> region byte count every second while a transfer runs."""

    link: WanLink
    samples: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            stats = self.link.stats()
            self.samples.append((stats.now_ns / 1e9, stats.up_in))


def outage(scratch: Path, timeout: float) -> None:
    spec = LINKS["20"]
    ct = Dataset.load("CT 60 x 0.5 MB", CT_DIR)
    # Studies stable only 5 s after their last instance: the whole set is ingested by then, so
    # every run makes the same 20 transfers with the same bucket plans, and the difference in
    # wire bytes between the runs is what the cut made PAS send again (plus TCP's own resends
    # and TLS reconnections), not a different split of the interleaved studies into deltas.
    env = {**pas_env(spec), "PAS_STUDY__STABLE_AFTER_S": "5"}
    with WanLink(spec) as link:
        clean = run_pas(link, ct, scratch / "clean", timeout, env)
        print(f"clean run: {clean.seconds:.1f} s, wire up {clean.wire_up / 1e6:.2f} MB "
              f"({clean.note})", flush=True)
        cut = {"at": 0.0, "end": 0.0, "in_flight": 0.0, "peak": 0.0}
        watch: dict[str, Any] = {}

        def cutter() -> None:
            threshold = clean.wire_up / 3
            while link.stats().up_in < threshold:
                time.sleep(0.05)
            cut["at"] = time.monotonic()
            link.outage(True)
            # The PUTs under way at the cut, from the appliance's own gauge (read over the
            # unshaped control veth; they hang until their timeout, so this is the cut's value).
            cut["in_flight"] = watch["appliance"].metric("pas_upload_inflight_bytes")
            # And the most under way at once while the link is down (a PUT may start on a
            # connection opened before the cut: its body goes into the socket, never across).
            cut["peak"] = cut["in_flight"]
            while time.monotonic() < cut["at"] + 30:  # the scenario itself: a 30 s cut
                time.sleep(0.1)
                cut["peak"] = max(cut["peak"],
                                  watch["appliance"].metric("pas_upload_inflight_bytes"))
            link.outage(False)
            cut["end"] = time.monotonic()

        link.reset()  # the cutter watches the counter of the next run only
        thread = threading.Thread(target=cutter, daemon=True)
        thread.start()
        cut_run = run_pas(link, ct, scratch / "cut", timeout, env, watch)
        thread.join(60)
    wire_extra = cut_run.wire_up - clean.wire_up
    # Bucket bytes sent again: what the appliance's PUT bodies handed to the network (every
    # attempt, counted by the appliance) minus one copy of each bucket (the hub's count). The
    # shaper's wire count cannot isolate it: TCP's own resends differ between runs by more.
    resent = cut_run.counters["put_bytes"] - cut_run.counters["stored_bytes"]
    clean_resent = clean.counters["put_bytes"] - clean.counters["stored_bytes"]
    verdict = "within" if resent <= cut["peak"] else "OVER"
    print(f"30 s outage after a third of the bytes: {'completed' if cut_run.ok else 'FAILED'} "
          f"in {cut_run.seconds:.1f} s ({cut_run.seconds - 30 - clean.seconds:.1f} s beyond "
          f"clean + 30 s); bucket bytes re-sent {resent / 1e6:.3f} MB (of which the hub got "
          f"{cut_run.counters['duplicate_bytes'] / 1e6:.3f} MB whole twice), {verdict} the PUTs "
          f"in flight: {cut['in_flight'] / 1e6:.3f} MB at the cut, at most "
          f"{cut['peak'] / 1e6:.3f} MB while down (clean run re-sent "
          f"{clean_resent / 1e6:.3f} MB); wire up {cut_run.wire_up / 1e6:.2f} MB "
          f"({wire_extra / 1e6:+.2f} MB against the clean run, TCP resends included); "
          f"{cut_run.note}", flush=True)


def cap(scratch: Path, timeout: float, cap_mbps: float = 8.0, study_mb: int = 320) -> None:
    spec = LINKS["20"]
    study = make_study(study_mb * 1_000_000, scratch / "cap-study")
    with WanLink(spec) as link:
        sampler = Sampler(link)
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()
        result = run_pas(link, study, scratch / "cap", timeout,
                         {**pas_env(spec), "PAS_HUB__MAX_MBPS": str(cap_mbps)})
        sampler.stop.set()
        thread.join(5)
    rates = _rates(sampler.samples)
    # The steadiest full 60 s window while sending (the shaper counts IP bytes: TLS, TCP and
    # IP headers included, about 4 % over the payload the cap meters).
    windows = [sum(rates[i:i + 60]) / 60 for i in range(0, max(len(rates) - 60, 0) + 1)
               if len(rates[i:i + 60]) == 60 and min(rates[i:i + 60]) > 0]
    print(f"cap {cap_mbps} Mbit/s on {spec.label()}, {study.name}: "
          f"{'ok' if result.ok else 'FAILED'} in {result.seconds:.0f} s, {result.note}")
    if windows:
        worst = max(windows, key=lambda w: abs(w - cap_mbps * 1e6))
        best = min(windows, key=lambda w: abs(w - cap_mbps * 1e6))
        mean = sum(windows) / len(windows)
        print(f"  60 s windows on the wire: {len(windows)}; mean {mean / 1e6:.2f} Mbit/s; "
              f"worst {worst / 1e6:.2f} ({worst / (cap_mbps * 1e6) - 1:+.1%}), "
              f"best {best / 1e6:.2f} ({best / (cap_mbps * 1e6) - 1:+.1%})", flush=True)
    else:
        print(f"  no full 60 s window of sending (samples: {len(rates)} s)", flush=True)


def _rates(samples: list[tuple[float, int]]) -> list[float]:
    """Bits per second between consecutive samples."""
    pairs = zip(samples, samples[1:], strict=False)
    return [(b1 - b0) * 8 / (t1 - t0) for (t0, b0), (t1, b1) in pairs if t1 > t0]


def memory(scratch: Path, timeout: float, gigabytes: float = 2.0) -> None:
    spec = LINKS["100"]
    started = time.monotonic()
    study = make_study(int(gigabytes * 1e9), scratch / "big-study")
    print(f"made {study.name}: {study.instances} instances in {time.monotonic() - started:.0f} s",
          flush=True)
    with WanLink(spec) as link:
        result = run_pas(link, study, scratch / "big", timeout, pas_env(spec))
    print(f"{study.name} on {spec.label()}: {'ok' if result.ok else 'FAILED'} in "
          f"{result.seconds:.0f} s, {result.x_link:.2f}x link, wire up "
          f"{result.wire_up / 1e6:.0f} MB; {result.note}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", default="outage,cap,memory")
    parser.add_argument("--big-gb", type=float, default=2.0)
    parser.add_argument("--cap-mbps", type=float, default=8.0)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="pas-bench-scen-"))
    try:
        for name in args.which.split(","):
            if name == "outage":
                outage(scratch, args.timeout)
            elif name == "cap":
                cap(scratch, args.timeout, args.cap_mbps)
            elif name == "memory":
                memory(scratch, args.timeout, args.big_gb)
            else:
                raise SystemExit(f"unknown scenario {name!r}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

