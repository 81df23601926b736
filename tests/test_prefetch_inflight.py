"""A prior already on its way down is not downloaded a second time, real peers end to end.

Found (2026-12-04): a second order for a patient whose prior was still downloading (its
batch had left: on a slow link, for minutes) asked the hub for the same study again, and the
hub sent again all the site did not hold yet: here 3 instances (0.5 MB packed), then the 2 not
filed yet a second time (0.4 MB), across the WAN (only the index kept the site from filing
them twice). Now the later request joins the download on its way and waits for it; if that
download fails, the later request downloads the rest itself at once.

Real Orthanc (DICOMweb, its own network namespace) behind a real hub (``pas hub run``, mutual
TLS), ``pas run`` enrolled with it, orders over MLLP. The first download is held on its way
by a proxy on the site's link (the bytes beyond a stop wait at the proxy, the
hub's answer stalled by TCP flow control) for as long as the test needs, however loaded the
machine: the second order arrives while it is certainly in flight, then the download goes on
(or its connection is cut).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hl7.client import MLLPClient
from pydicom import dcmread

from tests.support.cleanup import started
from tests.support.hub import HubProcess, enroll
from tests.support.peers import CT_DIR, Orthanc, PasProcess, port_open, read_rows, wait_for
from tests.support.peers import prefetch_requests as prefetch_rows
from tests.support.tcpproxy import TcpProxy, _reset

pytestmark = pytest.mark.root

PATIENT = "A002304"  # two CT studies of three files; the rule picks the newer one
# Bytes towards the site on the download's connection where the proxy holds it: the prior
# packs to ~0.5 MB, ~170 kB an instance; at 150 kB none is filed yet, at 300 kB the first is
# and the last is not.
BEFORE_THE_FIRST, AFTER_THE_FIRST = 150_000, 300_000


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HoldingProxy(TcpProxy):
    """The site's link to the hub. The first connection that carries ``stops[0]`` bytes
    towards the site (the download: searches and keep-alives carry a few kB) is held there:
    nothing more passes on it until ``release()``, then up to the next stop, and so on; or
    it is cut by ``cut_held()``. Every other connection passes, before and after."""

    def __init__(self, upstream_host: str, upstream_port: int, stops: list[int]):
        super().__init__(upstream_host, upstream_port)
        self.stops = stops
        self.holding = threading.Event()  # set while the connection is held at a stop
        self.stops_reached = 0
        self._go = threading.Event()
        self._held: tuple[socket.socket, socket.socket] | None = None

    def release(self) -> None:
        self.holding.clear()
        self._go.set()

    def cut_held(self) -> None:
        """The held connection dies the way a dead link does (RST both ways)."""
        assert self._held is not None
        for sock in self._held:
            _reset(sock)
        self._go.set()

    def _pump(self, source: socket.socket, sink: socket.socket, upward: bool) -> None:
        if upward:
            super()._pump(source, sink, upward)
            return
        passed = 0
        stops = list(self.stops)
        mine = False
        try:
            while chunk := source.recv(16384):
                if stops and passed + len(chunk) > stops[0]:
                    if not mine:
                        with self._lock:
                            mine = self._held is None
                            if mine:
                                self._held = (source, sink)
                    if mine:
                        stops.pop(0)
                        self._go.clear()
                        self.stops_reached += 1
                        self.holding.set()
                        self._go.wait()
                    else:
                        stops = []
                sink.sendall(chunk)
                passed += len(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                sock.close()


def orm(control: str, order: str) -> str:
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261204120000||ORM^O01|{control}|P|2.5",
        f"PID|1||{PATIENT}^^^^MR", f"ORC|NW|{order}|||SC",
        f"OBR|1|{order}||CT^CT||||||||||||||ACC-{order}||||||CT"])


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Orthanc holding the patient's two CT studies (through its REST API, which keeps each
    file byte for byte), a hub reading it; the prior is the newer study."""
    base = tmp_path_factory.mktemp("inflight")
    orthanc = Orthanc(base / "orthanc").start()
    hub = HubProcess(base / "hub", {"PAS_HUB_ARCHIVE__KIND": "dicomweb",
                                    "PAS_HUB_ARCHIVE__URL": orthanc.dicomweb})
    try:
        files = sorted(CT_DIR.glob(f"{PATIENT}_*.dcm"))
        for path in files:
            httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(),
                       timeout=60).raise_for_status()
        dates = {path: str(dcmread(path, stop_before_pixels=True).StudyDate) for path in files}
        prior = [path for path in files if dates[path] == max(dates.values())]
        study_uid = str(dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID)
        hub.init().start()
        yield {"orthanc": orthanc, "hub": hub, "base": base, "study_uid": study_uid,
               "count": len(prior)}
    finally:
        hub.stop()
        orthanc.stop()


# The rule: the newest CT prior. ``same = "body_part"`` (the order names none: any CT) takes
# the two-step path (search, then the batcher's download); ``"modality"`` the hub's priors
# route, where order 2, seeing its patient's download on its way, searches and joins it.
ROUTES = {"priors-route": "modality", "two-step": "body_part"}


class Site:
    """``pas run`` enrolled as ``name``, its link to the hub through a HoldingProxy."""

    def __init__(self, region: dict[str, Any], name: str, route: str, stops: list[int]):
        self.name = name
        self.hub: HubProcess = region["hub"]
        with contextlib.ExitStack() as stack:  # a step that raises stops those started
            self.proxy = started(stack, HoldingProxy("127.0.0.1", self.hub.port, stops))
            home = region["base"] / name
            enrolment = enroll(self.hub, home, name)
            path = home / "pki" / "hub.json"
            path.write_text(path.read_text().replace(enrolment.url,
                                                     f"https://localhost:{self.proxy.port}"))
            self.pas = started(stack, PasProcess(home, {
                "PAS_PREFETCH__RETRY_AFTER_S": "1", "PAS_PREFETCH__CHECK_INTERVAL_S": "0.2",
                "PAS_PREFETCH__DOWNLOAD_BUCKET_KB": "64", "PAS_OPS__HEARTBEAT": "false",
                "PAS_PREFETCH__RULES": '[{name = "ct", modality = "^CT$", priors = 1, '
                                       f'same = "{ROUTES[route]}"}}]'}))
            port = int(self.pas.env["PAS_HL7__PORT"])
            wait_for(lambda: port_open("127.0.0.1", port), 30, what="the HL7 listener")
            # The hub's features known (its priors route): the first order takes it.
            wait_for(lambda: "hub connection open" in self.pas.log(), 30,
                     what=f"the hub connection kept warm ({self.pas.log_path})")
            stack.pop_all()  # set up: stop() stops them from now on

    def order(self, n: int) -> None:
        with MLLPClient("127.0.0.1", int(self.pas.env["PAS_HL7__PORT"])) as mllp:
            assert "MSA|AA|" in mllp.send_message(orm(f"C{n}", f"O{n}")).decode()

    def rows(self) -> dict[str, dict[str, Any]]:
        """The requests by order number."""
        return {r["dedup_key"].rsplit("|", 1)[1]: r for r in prefetch_rows(self.pas)}

    def first_in_flight_then_second(self, filed_first: int) -> None:
        """Order 1; once its download is held on its way with ``filed_first`` instances
        filed, order 2; returns once order 2 waits for that download (or, as before the
        fix, has fetched the prior itself)."""
        self.order(1)
        wait_for(self.proxy.holding.is_set, 60, interval=0.05,
                 what=f"the first download on its way ({self.pas.log_path})")
        wait_for(lambda: self.rows()["O1"]["instances_fetched"] >= filed_first, 60,
                 interval=0.05, what=f"the first download's instances ({self.pas.log_path})")
        self.order(2)
        wait_for(lambda: "is already on its way down" in self.pas.log()
                 or self.rows().get("O2", {}).get("state") in ("fetched", "failed"), 60,
                 interval=0.05, what=f"the second order's prior ({self.pas.log_path})")

    def both_done(self) -> dict[str, dict[str, Any]]:
        def done() -> dict[str, dict[str, Any]] | None:
            rows = self.rows()
            return rows if len(rows) == 2 and all(
                r["state"] in ("fetched", "failed") for r in rows.values()) else None

        return wait_for(done, 120, interval=0.2, what=f"both orders ({self.pas.log_path})")

    def assert_prior_on_site_as_in_orthanc(self, orthanc: Orthanc, count: int) -> None:
        """Every file on site (and only the prior's, once each) has the SHA-256 of the file
        Orthanc holds."""
        held = read_rows(self.pas.home / "pas.sqlite",
                         "SELECT sop_instance_uid, sha256, path FROM instances "
                         "WHERE is_current = 1")
        assert len(held) == count
        everything = read_rows(self.pas.home / "pas.sqlite", "SELECT count(*) AS n FROM instances")
        assert everything[0]["n"] == count  # none filed twice
        for row in held:
            (found,) = httpx.post(f"{orthanc.url}/tools/find", timeout=30, json={
                "Level": "Instance", "Query": {"SOPInstanceUID": row["sop_instance_uid"]}}
            ).json()
            original = httpx.get(f"{orthanc.url}/instances/{found}/file", timeout=30).content
            assert sha256(original) == row["sha256"]
            assert sha256((self.pas.home / "spool" / row["path"]).read_bytes()) == row["sha256"]

    def sent_by_hub(self, study_uid: str, at_least: int) -> list[tuple[str, int, int]]:
        """Each download of the study for this site, as the hub logged it: how it ended, the
        instances it sent, those the site held. The hub logs a download once its answer is
        over, which may be just after the site has all of it: ``at_least`` are awaited."""
        def logged() -> list[tuple[str, int, int]] | None:
            found = [(how, int(n), int(held)) for how, n, held in re.findall(
                rf"download of study {re.escape(study_uid)} for {self.name} (sent|ended "
                r"early|failed): (\d+) instances? \((\d+) held at the site", self.hub.log())]
            return found if len(found) >= at_least else None

        return wait_for(logged, 30, interval=0.1, what=f"the hub's log of {study_uid}")

    def stop(self) -> None:
        self.pas.stop()
        self.proxy.stop()


@pytest.mark.parametrize("route", ROUTES)
def test_a_prior_on_its_way_down_is_not_sent_again(region: dict[str, Any], route: str) -> None:
    """Order 2 wants the prior order 1 is downloading: it waits for that download, the hub
    sends the study once (3 instances, not 3 + the 2 not filed yet), both requests fetched,
    each credited with the prior's instances."""
    site = Site(region, f"SITE-INFLIGHT-{route.upper()}", route, [AFTER_THE_FIRST])
    try:
        site.first_in_flight_then_second(filed_first=1)  # order 2 is credited with it
        site.proxy.release()
        rows = site.both_done()
        count = region["count"]
        sent = site.sent_by_hub(region["study_uid"], at_least=1)
        assert [(how, n) for how, n, _ in sent] == [("sent", count)], site.hub.log()[-3000:]
        assert {o: (r["state"], r["studies_found"], r["studies_fetched"], r["instances_fetched"])
                for o, r in rows.items()} == {"O1": ("fetched", 1, 1, count),
                                              "O2": ("fetched", 1, 1, count)}, rows
        assert "is already on its way down" in site.pas.log()
        site.assert_prior_on_site_as_in_orthanc(region["orthanc"], count)
    finally:
        site.stop()


@pytest.mark.parametrize("route", ROUTES)
def test_a_later_request_downloads_the_prior_itself_when_the_one_it_waited_for_fails(
        region: dict[str, Any], route: str) -> None:
    """Order 2 waits for order 1's download, whose link is then cut: order 2 is not failed
    with it (no retry, no error) but asks at once for what the cut download did not file;
    order 1, tried again, finds the prior whole on site. Each instance lands once, byte for
    byte."""
    site = Site(region, f"SITE-CUT-{route.upper()}", route,
                [BEFORE_THE_FIRST, AFTER_THE_FIRST])
    try:
        site.first_in_flight_then_second(filed_first=0)
        assert "(request 1's download, 0 instances filed so far): waits for it" in site.pas.log()
        # An instance filed after order 2 joined: the download order 2 makes itself after
        # the cut does not ask for it again.
        site.proxy.release()
        wait_for(lambda: site.proxy.stops_reached == 2 and site.proxy.holding.is_set(), 60,
                 interval=0.05, what="the first download held again")
        wait_for(lambda: site.rows()["O1"]["instances_fetched"] >= 1, 60, interval=0.05,
                 what=f"an instance filed ({site.pas.log_path})")
        site.proxy.cut_held()
        rows = site.both_done()
        count = region["count"]
        assert {o: (r["state"], r["studies_fetched"]) for o, r in rows.items()} == {
            "O1": ("fetched", 1), "O2": ("fetched", 1)}, rows
        # Order 1 was cut (it waited for the link and was tried again); order 2 was not.
        first, second = rows["O1"]["id"], rows["O2"]["id"]
        assert f"prefetch {first} for {PATIENT}: the region is unreachable" in site.pas.log()
        assert f"prefetch {second} for {PATIENT}: " not in site.pas.log()
        assert re.search(rf"prefetch {second}: the download of prior "
                         rf"{re.escape(region['study_uid'])} it waited for failed \(.*cut after"
                         r".*\): its own download now", site.pas.log())
        # The second download asked only for what the first had not filed.
        (how, n, held), = site.sent_by_hub(region["study_uid"], at_least=2)[1:]
        assert how == "sent" and n + held == count and n >= 1 and held >= 1
        assert rows["O2"]["instances_fetched"] == count
        site.assert_prior_on_site_as_in_orthanc(region["orthanc"], count)
    finally:
        site.stop()
