"""PAS in the WAN benchmark: appliance (site namespace) -> hub (region) -> regional Orthanc.

Owns: setting up a real hub (``pas hub init/token/run``, archive ``dicomweb`` to the regional
Orthanc beside it), enrolling a real appliance over the emulated link (``pas enroll``), running
``pas run`` in the site namespace, loading the study into it with storescu over the unshaped
control veth, and timing the upload from the first packet the shaper carries site -> region to
the moment the appliance holds the receipt (every instance ``confirmed``). Touches nothing
outside its scratch folder and the link's namespaces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from bench.wan.link import WanLink
from bench.wan.peers import Dataset, Result, regional_orthanc, stored_count
from tests.support.peers import DCMTK_ENV, PAS_BIN, free_port, port_open, read_rows, wait_for

HUB_PORT = 8443
SITE = "bench-site"


class Hub:
    """``pas hub run`` in the region namespace, archiving by STOW-RS to the regional Orthanc."""

    def __init__(self, link: WanLink, home: Path, archive_url: str):
        self.link = link
        self.home = home
        self.env = {**os.environ, "PAS_HUB_HOME": str(home),
                    "PAS_HUB_HTTP__HOST": "0.0.0.0", "PAS_HUB_HTTP__PORT": str(HUB_PORT),
                    "PAS_HUB_ARCHIVE__KIND": "dicomweb", "PAS_HUB_ARCHIVE__URL": archive_url,
                    # Orthanc beside the hub in the region namespace, plain http://.
                    "PAS_HUB_ARCHIVE__ALLOW_CLEARTEXT": "true"}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://{self.link.region_ip}:{HUB_PORT}"

    def _pas(self, *args: str) -> str:
        result = subprocess.run([str(PAS_BIN), "hub", *args], env=self.env, capture_output=True,
                                text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"pas hub {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout.strip()

    def start(self) -> Hub:
        self.home.mkdir(parents=True, exist_ok=True)
        self._pas("init", "--address", self.link.region_ip)
        log = open(self.home / "hub.log", "ab")
        self.proc = subprocess.Popen(self.link.in_region([str(PAS_BIN), "hub", "run"]),
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is None  # type: ignore[union-attr]
                 and port_open(self.link.region.inner_address, HUB_PORT), 60, what="the hub")
        return self

    def token(self) -> str:
        return self._pas("token", SITE).splitlines()[-1]

    def stop(self) -> None:
        _stop(self.proc)


class SiteAppliance:
    """``pas run`` in the site namespace; DICOM and HTTP reachable over the control veth."""

    def __init__(self, link: WanLink, home: Path, env: dict[str, str]):
        self.link = link
        self.home = home
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.env = {
            **os.environ, "PAS_HOME": str(home),
            "PAS_DICOM__HOST": "0.0.0.0", "PAS_DICOM__PORT": str(self.dicom_port),
            "PAS_DICOM__ACCEPT_UNKNOWN": "true",
            "PAS_HTTP__HOST": "0.0.0.0", "PAS_HTTP__PORT": str(self.http_port),
            "PAS_HL7__HOST": "127.0.0.1", "PAS_HL7__PORT": str(free_port()),
            "PAS_STUDY__STABLE_AFTER_S": "1", "PAS_STUDY__CHECK_INTERVAL_S": "0.2",
            "PAS_QUEUE__POLL_INTERVAL_S": "0.2", "PAS_STORAGE__MIN_FREE_MB": "0",
            # Only the upload crosses the link while it is timed: no heartbeat, no prior
            # queries on arrival (both measured on their own, not here).
            "PAS_OPS__HEARTBEAT": "false", "PAS_PREFETCH__ENABLED": "false",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def enroll(self, hub: Hub) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(self.link.in_site([str(PAS_BIN), "enroll", "--hub", hub.url,
                                                   "--token", hub.token()]),
                                env=self.env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"pas enroll: {result.stdout}{result.stderr}")

    def start(self) -> SiteAppliance:
        log = open(self.home / "pas.log", "ab")
        self.proc = subprocess.Popen(self.link.in_site([str(PAS_BIN), "run"]), env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.home)
        host = self.link.site.inner_address
        wait_for(lambda: self.proc.poll() is None  # type: ignore[union-attr]
                 and port_open(host, self.dicom_port), 60, what="pas run in the site namespace")
        return self

    def status(self) -> dict[str, Any]:
        url = f"http://{self.link.site.inner_address}:{self.http_port}/api/status"
        return httpx.get(url, timeout=10).json()

    def peak_rss_mb(self) -> float:
        """VmHWM of the daemon (the child of ``ip netns exec``, which execs into it)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        _stop(self.proc)

    def metric(self, name: str) -> float:
        """One unlabelled sample of the daemon's /metrics (over the control veth)."""
        url = f"http://{self.link.site.inner_address}:{self.http_port}/metrics"
        for line in httpx.get(url, timeout=10).text.splitlines():
            if line.split(" ")[0] in (name, name + "_total"):
                return float(line.split()[-1])
        raise KeyError(name)

    def upload_summary(self) -> str:
        """What the uplink chose, from its jobs' progress: the packing level per bucket
        (``pack_level = "auto"`` shows its choice here)."""
        chosen: dict[str, int] = {}
        for row in read_rows(self.home / "pas.sqlite", "SELECT progress FROM jobs WHERE "
                             "kind = 'hub'"):
            progress = json.loads(row["progress"] or "{}")
            for level, count in progress.get("pack_levels", {}).items():
                chosen[level] = chosen.get(level, 0) + count
        levels = ", ".join(f"{level} x{count}" for level, count in sorted(chosen.items()))
        return f"buckets packed {levels or 'none'}"


def _profile(procs: dict[str, subprocess.Popen[bytes] | None]) -> list[subprocess.Popen[bytes]]:
    """With PAS_BENCH_PYSPY=<folder>: py-spy (pip-installed in the venv, not a project
    dependency) samples the appliance and the hub while the study is timed; collapsed stacks
    land in <folder>/<name>.txt (summarise with ``python -m bench.wan.profile``)."""
    folder = os.environ.get("PAS_BENCH_PYSPY")
    if not folder:
        return []
    Path(folder).mkdir(parents=True, exist_ok=True)
    spy = Path(PAS_BIN).parent / "py-spy"
    return [subprocess.Popen([str(spy), "record", "--format", "raw", "--rate", "200",
                              "--threads", "-p", str(proc.pid), "-o",
                              f"{folder}/{name}-{proc.pid}.txt"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, proc in procs.items() if proc is not None]


def _quiet(link: WanLink, quiet_s: float = 0.5, timeout: float = 15.0) -> None:
    """Wait until nothing crossed the link for ``quiet_s``: the daemon's start-up calls to
    the hub (it opens its connections when it starts) are not part of the timed study."""
    deadline = time.monotonic() + timeout
    last, since = link.stats().wire_bytes, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = link.stats().wire_bytes
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


def _cpu_s(proc: subprocess.Popen[bytes] | None) -> float:
    """User + system CPU seconds of a running process (0 if gone)."""
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (AttributeError, OSError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _keep(hub: Hub, appliance: SiteAppliance, start_ns: int, end_ns: int) -> None:
    """With PAS_BENCH_KEEP=<folder>: copy the hub's and the appliance's databases and logs
    there, with the timed window (CLOCK_MONOTONIC and wall clock), for
    ``python -m bench.wan.profile --timeline``."""
    folder = os.environ.get("PAS_BENCH_KEEP")
    if not folder:
        return
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for source in (hub.home / "hub.sqlite", hub.home / "hub.log",
                   appliance.home / "pas.sqlite", appliance.home / "pas.log"):
        if source.exists():
            subprocess.run(["sqlite3", str(source), f".backup {out / source.name}"]
                           if source.suffix == ".sqlite" else
                           ["cp", str(source), str(out / source.name)], check=False)
    wall_end = time.time()
    (out / "window.json").write_text(json.dumps({
        "start_wall": wall_end - (time.monotonic_ns() - start_ns) / 1e9,
        "end_wall": wall_end - (time.monotonic_ns() - end_ns) / 1e9}))


def _stop(proc: subprocess.Popen[bytes] | None, how: int = signal.SIGTERM) -> None:
    if proc and proc.poll() is None:
        proc.send_signal(how)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_pas(link: WanLink, dataset: Dataset, scratch: Path, timeout: float,
            env: dict[str, str] | None = None,
            watch: dict[str, Any] | None = None) -> Result:
    """One study through PAS; ``env`` adds PAS_HUB__* knobs (parallel buckets, level, cap).
    ``watch["appliance"]`` is set to the running appliance (a scenario reads its metrics).
    The result's counters: ``put_bytes`` (the appliance's PUT bodies, every attempt),
    ``stored_bytes`` (one copy of each bucket, the hub's count) and ``duplicate_bytes`` (whole
    bodies the hub received more than once)."""
    regional = regional_orthanc(link, scratch / "region-pas")
    hub = appliance = None
    try:
        hub = Hub(link, scratch / "hub", "http://127.0.0.1:8042/dicom-web").start()
        appliance = SiteAppliance(link, scratch / "appliance", env or {})
        appliance.enroll(hub)
        appliance.start()
        if watch is not None:
            watch["appliance"] = appliance
        profilers = _profile({"appliance": appliance.proc, "hub": hub.proc})
        procs = {"appliance (with ingest)": appliance.proc, "hub": hub.proc,
                 "regional Orthanc": regional.proc}
        cpu_before = {name: _cpu_s(proc) for name, proc in procs.items()}
        _quiet(link)
        link.reset()
        ingest = subprocess.run(
            ["storescu", "-aec", "PAS", "-aet", "MODALITY", "+sd", "+r",
             link.site.inner_address, str(appliance.dicom_port), str(dataset.folder)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)
        if ingest.returncode != 0:
            raise RuntimeError(f"storescu into PAS failed: {ingest.stderr[-2000:]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if appliance.status()["confirmed_instances"] >= dataset.instances:
                break
            if appliance.proc is not None and appliance.proc.poll() is not None:
                break
            time.sleep(0.05)  # as wait_for polls the peers
        end_ns = time.monotonic_ns()
        cpu = {name: _cpu_s(proc) - cpu_before[name] for name, proc in procs.items()}
        stats = link.stats()
        for profiler in profilers:
            _stop(profiler, signal.SIGINT)
        alive = appliance.proc is not None and appliance.proc.poll() is None
        status = appliance.status() if alive else {}
        counters = {"put_bytes": appliance.metric("pas_upload_put_bytes") if alive else 0.0,
                    "stored_bytes": 0.0, "duplicate_bytes": 0.0}
        for row in read_rows(hub.home / "hub.sqlite",
                             "SELECT bytes_stored, bytes_received FROM transfers"):
            counters["stored_bytes"] += row["bytes_stored"]
            counters["duplicate_bytes"] += row["bytes_received"] - row["bytes_stored"]
        confirmed = int(status.get("confirmed_instances", 0))
        stored = stored_count(regional)
        # Bytes the drop-tail queue or the random loss threw away: TCP sent them again, so
        # they are in the wire count too (many parallel connections overflow a BDP queue).
        note = (f"{appliance.upload_summary()}; "
                f"rss {appliance.peak_rss_mb():.0f} MB; dropped up: queue "
                f"{stats.up_drop_queue / 1e6:.2f} MB, loss {stats.up_drop_loss / 1e6:.2f} MB")
        note += "; cpu s: " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in cpu.items())
        if confirmed < dataset.instances:
            note += f"; only {confirmed} confirmed (jobs {status.get('jobs')})"
        start_ns = stats.first_up_ns or end_ns
        _keep(hub, appliance, start_ns, end_ns)
        return Result(link.spec, dataset, "PAS", (end_ns - start_ns) / 1e9, stats.up_in,
                      stats.down_in, min(stored, confirmed), note, counters)
    finally:
        if appliance:
            appliance.stop()
        if hub:
            hub.stop()
        regional.stop()
