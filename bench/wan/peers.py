"""The reference peers of the WAN benchmark: DCMTK storescu and Orthanc -> Orthanc STOW-RS.

Owns: running one peer's transfer of one data set across a ``WanLink`` to a fresh regional
Orthanc in the region namespace, and measuring it (seconds from the first packet the shaper
carried site -> region to the last instance stored, and the bytes the shaper counted). Touches
nothing outside the link's namespaces and its own scratch folder.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom

from bench.wan.link import LinkSpec, WanLink
from tests.support.peers import DCMTK_ENV, Orthanc, wait_for


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    folder: Path
    files: tuple[Path, ...]
    original_bytes: int
    instances: int  # distinct SOP Instance UIDs: what the regional archive must end up with

    @classmethod
    def load(cls, name: str, folder: Path) -> Dataset:
        files = tuple(sorted(p for p in folder.rglob("*.dcm") if p.is_file()))
        uids = {pydicom.dcmread(p, stop_before_pixels=True,
                                specific_tags=["SOPInstanceUID"]).SOPInstanceUID for p in files}
        return cls(name, folder, files, sum(p.stat().st_size for p in files), len(uids))


@dataclasses.dataclass
class Result:
    link: LinkSpec
    dataset: Dataset
    peer: str
    seconds: float
    wire_up: int
    wire_down: int
    stored: int
    note: str = ""
    counters: dict[str, float] = dataclasses.field(default_factory=dict)  # peer-specific figures

    @property
    def ok(self) -> bool:
        return self.stored == self.dataset.instances

    @property
    def x_link(self) -> float:
        """Original study bytes per second as a multiple of the link's byte rate."""
        return self.dataset.original_bytes / self.seconds / self.link.bytes_per_s


def regional_orthanc(link: WanLink, folder: Path) -> Orthanc:
    """A fresh regional PACS in the region namespace (its data address: ``link.region_ip``)."""
    return Orthanc(folder, ae_title="REGION", ns=link.region).start()


def stored_count(orthanc: Orthanc) -> int:
    return int(orthanc.get("/statistics").json()["CountInstances"])


def measure(link: WanLink, dataset: Dataset, peer: str, regional: Orthanc,
            transfer: Callable[[], str], timeout: float) -> Result:
    """Reset the counters, run ``transfer`` (which returns a note), wait for every instance."""
    link.reset()
    note = transfer()
    try:
        wait_for(lambda: stored_count(regional) >= dataset.instances, timeout,
                 what=f"{dataset.instances} instances at the regional Orthanc")
    except TimeoutError as exc:  # reported as a failed row, the run goes on
        note = f"{note} {exc}".strip()
    end_ns = time.monotonic_ns()  # CLOCK_MONOTONIC, the shaper's clock too
    stats = link.stats()
    start_ns = stats.first_up_ns or end_ns
    note = (f"{note} dropped up: queue {stats.up_drop_queue / 1e6:.2f} MB, loss "
            f"{stats.up_drop_loss / 1e6:.2f} MB").strip()
    return Result(link.spec, dataset, peer, (end_ns - start_ns) / 1e9, stats.up_in,
                  stats.down_in, stored_count(regional), note)


def run_storescu(link: WanLink, dataset: Dataset, scratch: Path, timeout: float) -> Result:
    """What hospitals do today: one DIMSE association, one C-STORE after the other."""
    regional = regional_orthanc(link, scratch / "region-storescu")
    try:
        def transfer() -> str:
            result = subprocess.run(
                link.in_site(["storescu", "-aec", "REGION", "-aet", "SITE", "+sd", "+r",
                              link.region_ip, str(regional.dicom_port), str(dataset.folder)]),
                env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)
            return "" if result.returncode == 0 else f"storescu rc={result.returncode}"
        return measure(link, dataset, "DCMTK storescu", regional, transfer, 60)
    finally:
        regional.stop()


def run_orthanc_stow(link: WanLink, dataset: Dataset, scratch: Path, timeout: float) -> Result:
    """A site Orthanc pushing the study to the regional Orthanc with its DICOMweb client."""
    regional = regional_orthanc(link, scratch / "region-stow")
    site = Orthanc(scratch / "site-orthanc", ae_title="SITE", ns=link.site, extra_config={
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/",
                     "Servers": {"region": [f"http://{link.region_ip}:8042/dicom-web/"]}},
        # Orthanc's default HTTP client timeout (60 s) is shorter than a study takes at
        # 4 Mbit/s; a peer that gives up is not the peer we want to compare against.
        "HttpTimeout": int(timeout),
    }).start()
    try:
        # Loading the site Orthanc goes over the unshaped control veth, before the clock starts.
        with httpx.Client(timeout=60) as client:
            for path in dataset.files:
                client.post(f"{site.url}/instances", content=path.read_bytes()).raise_for_status()
        studies = site.get("/studies").json()

        def transfer() -> str:
            response = httpx.post(f"{site.url}/dicom-web/servers/region/stow",
                                  json={"Resources": studies, "Synchronous": True},
                                  timeout=timeout)
            return "" if response.status_code == 200 else f"stow HTTP {response.status_code}"
        return measure(link, dataset, "Orthanc STOW-RS", regional, transfer, 60)
    finally:
        site.stop()
        regional.stop()


def run_archive_floor(link: WanLink, dataset: Dataset, scratch: Path, timeout: float) -> Result:
    """No WAN at all: STOW-RS of the study straight into the regional Orthanc over the control
    veth. Every peer ends with this archive storing the study, so its own ingest time is a
    floor no transport can beat; it is reported beside the peers to show what limits them."""
    regional = regional_orthanc(link, scratch / "region-floor")
    try:
        def transfer() -> str:
            boundary = "pas-bench-floor"
            parts = [b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                     + p.read_bytes() + b"\r\n" for p in dataset.files]
            body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
            started = time.monotonic_ns()
            response = httpx.post(
                f"{regional.dicomweb}/studies", content=body, timeout=timeout,
                headers={"Content-Type": "multipart/related; type=\"application/dicom\"; "
                         f"boundary={boundary}", "Accept": "application/dicom+json"})
            floor_start[0] = started
            return "" if response.status_code == 200 else f"HTTP {response.status_code}"
        floor_start = [0]
        link.reset()
        note = transfer()
        wait_for(lambda: stored_count(regional) >= dataset.instances, 60,
                 what="the study in the regional Orthanc")
        seconds = (time.monotonic_ns() - floor_start[0]) / 1e9
        return Result(link.spec, dataset, "archive alone (no WAN)", seconds, 0, 0,
                      stored_count(regional), note)
    finally:
        regional.stop()
