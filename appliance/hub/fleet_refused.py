"""The sites the hub turns away for their certificate: remembered, shown, logged once a minute.

Owns: :class:`RefusedCertificates`, told by the client-certificate gate
(:class:`appliance.hub.app.ClientCertificateGate`) of each request it refuses (a certificate
revoked, superseded, or unknown to this hub) and of each it lets in; read by the fleet
dashboard and ``/metrics`` (:func:`appliance.hub.fleet.site_rows`). May not touch: SQL, the
network, the PKI.

Why: after ``pas hub restore``, a site enrolled (or enrolled again) after the backup holds a
certificate the fleet CA signed (the TLS handshake verified it) that the restored database
never issued: every request of it is refused (403 ``certificate_unknown``) until it enrols
again, as documented; but nothing showed it. The dashboard listed only the restored
database's sites (a new one was on no page; one revoked in the backup and enrolled again
since read "revoked", no problem), ``/metrics`` had no series for it and no alert fired:
only a WARNING line per request in the hub's journal (11 to 18 a minute for one site,
~20,000 a day). A hospital whose studies no longer reached the region was invisible. The
certificate's subject names its site, so the hub can say which: such a site is a fleet row
``refused`` (a problem, as a site down), with a gauge, until a request of the site is let
in (enrolled again) or it stops calling for :data:`KEPT_S`.

A revoked certificate (``pas hub revoke``: a closed site, a stolen box) and a superseded one
(a newer certificate of its site is in use) are refused on purpose: they are counted here
only for their log lines, never shown as a problem.

Kept in the hub's memory, not in ``hub.sqlite``: the condition is about the database the
hub runs on now (a row written there would be carried by the next backup into a future
restore, where it would mean nothing), a refused appliance calls again within its heartbeat
interval (30 s) so a restarted hub knows it again at once, and a database write per refused
request (one every few seconds per site) is what a refusal should not cost. Bounded: at most
:data:`MAX_TRACKED` certificates (the least recently refused is forgotten first), each
forgotten :data:`KEPT_S` after its last refusal.

The journal: the first refusal of a certificate is one WARNING line at once, then one line a
minute at most with how many were refused meanwhile (:class:`appliance.hub.fleet_gate.
LogPace`, as the heartbeat gate's 429s), and one line when its site is let in again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from appliance.hub.fleet_gate import LOG_EVERY_S, LogPace
from appliance.words import counted, local_time

log = logging.getLogger("pas.hub")

# Certificates tracked at most: a region has tens to hundreds of sites, and only certificates
# the fleet CA signed reach the gate (the TLS handshake refused the others), so this is room
# for every site of a large region twice over, a few hundred kilobytes at most.
MAX_TRACKED = 512
# A certificate not refused for a day is forgotten: its box stopped calling (an appliance
# still running calls every 30 s: heartbeats, and its uploads' retries).
KEPT_S = 86400.0
# The refusals that are a problem of the fleet: a certificate the fleet CA signed that this
# hub never issued (enrolled after the backup it was restored from).
PROBLEM_STATE = "unknown"
# Characters kept of the last request refused ("POST /api/v1/transfers/<id>/buckets/3").
MAX_SAID = 200


@dataclass
class Refusal:
    """One certificate's refusals since the first (hub clock, ``time.time``)."""

    site: str
    serial: str
    fingerprint: str              # SHA-256 of the certificate (DER), hex
    state: str                    # what certificate_state said: unknown, revoked, superseded
    first_at: float
    last_at: float
    count: int = 0
    request: str = ""             # the last one refused: "POST /api/v1/heartbeat"
    client: str = "?"             # and where it came from
    resolved_at: float | None = None  # when its site was let in with another certificate
    pace: LogPace = field(default_factory=LogPace, repr=False)


class RefusedCertificates:
    """The certificates refused lately, per site; thread-safe (the gate runs on the event
    loop, ``/metrics`` and the dashboard read from worker threads)."""

    def __init__(self, max_tracked: int = MAX_TRACKED, kept_s: float = KEPT_S,
                 log_every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.time,
                 pace_clock: Callable[[], float] = time.monotonic):
        self.max_tracked, self.kept_s, self.log_every_s = max_tracked, kept_s, log_every_s
        self.clock, self.pace_clock = clock, pace_clock
        self._by_site: dict[str, dict[str, Refusal]] = {}
        self._tracked = 0
        self._lock = threading.Lock()

    def refused(self, site: str, serial: str, fingerprint: str, state: str, request: str,
                client: str) -> None:
        """Count one request refused (403) for its certificate, and log it: at once the
        first time, else at most once per ``log_every_s`` with how many meanwhile."""
        request = request[:MAX_SAID]  # the path is the client's to choose: kept bounded
        with self._lock:
            at, paced = self.clock(), self.pace_clock()
            self._forget(at)
            entry = self._by_site.get(site, {}).get(serial)
            if entry is None or entry.state != state:  # new, or its state changed: said anew
                if entry is None:
                    self._make_room()
                    self._tracked += 1
                entry = Refusal(site, serial, fingerprint, state, at, at,
                                pace=LogPace(self.log_every_s))
                self._by_site.setdefault(site, {})[serial] = entry
            entry.count += 1
            entry.last_at, entry.request, entry.client = at, request, client
            again = entry.pace.said_before
            said = entry.pace.count(paced)
            if said is None:
                return
            first_at, total = entry.first_at, entry.count
        fields = {"SITE": site, "SERIAL": serial, "REFUSED": said}
        if not again:
            log.warning("refused %s from site %s (%s): certificate %s is %s%s; further "
                        "refusals of this certificate are logged once a minute at most",
                        request, site, client, serial, state, _why(state, site), extra=fields)
        else:
            log.warning("site %s: %s with certificate %s (%s) refused since the last such "
                        "line (%d since %s), the last %s from %s", site,
                        counted(said, "request"), serial, state, total, _local(first_at),
                        request, client, extra=fields)

    def accepted(self, site: str, serial: str) -> None:
        """A request of ``site`` let in with certificate ``serial``: its refusals for an
        unknown certificate are no longer a problem (it enrolled again), said once. One
        dictionary look-up when the site has none, the usual case (every request passes)."""
        if site not in self._by_site:
            return
        with self._lock:
            resolved = [e for e in self._by_site.get(site, {}).values()
                        if e.state == PROBLEM_STATE and e.resolved_at is None
                        and e.serial != serial]
            at = self.clock()
            for entry in resolved:
                entry.resolved_at = at
        for entry in resolved:
            log.info("site %s: let in again, with certificate %s; its certificate %s, unknown "
                     "to this hub, was refused %s since %s", site, serial, entry.serial,
                     counted(entry.count, "time"), _local(entry.first_at),
                     extra={"SITE": site, "SERIAL": entry.serial})

    def problems(self) -> dict[str, Refusal]:
        """Per site refused lately for a certificate unknown to this hub and not let in
        since: the most recently refused such certificate (a copy)."""
        with self._lock:
            self._forget(self.clock())
            shown: dict[str, Refusal] = {}
            for site, entries in self._by_site.items():
                for entry in entries.values():
                    if entry.state != PROBLEM_STATE or entry.resolved_at is not None:
                        continue
                    if site not in shown or entry.last_at > shown[site].last_at:
                        shown[site] = replace(entry)
            return shown

    def _forget(self, at: float) -> None:
        """Drop what was not refused for ``kept_s`` (lock held)."""
        for site in list(self._by_site):
            entries = self._by_site[site]
            for serial in [s for s, e in entries.items() if at - e.last_at > self.kept_s]:
                del entries[serial]
                self._tracked -= 1
            if not entries:
                del self._by_site[site]

    def _make_room(self) -> None:
        """At :attr:`max_tracked`, forget the least recently refused certificate (lock
        held): its box calls again within a minute if it still runs, and is counted anew."""
        if self._tracked < self.max_tracked:
            return
        site, serial = min(((s, e.serial) for s, entries in self._by_site.items()
                            for e in entries.values()),
                           key=lambda key: self._by_site[key[0]][key[1]].last_at)
        del self._by_site[site][serial]
        self._tracked -= 1
        if not self._by_site[site]:
            del self._by_site[site]


def _local(at: float) -> str:
    return local_time(at)


def _why(state: str, site: str) -> str:
    """What regional ops should make of a refusal, said with its first log line."""
    if state == PROBLEM_STATE:
        return (": signed by this hub's fleet CA but unknown to this hub (enrolled after the "
                f"backup it was restored from?): issue a token (pas hub token {site}) and "
                "enrol it again (pas enroll --replace at the site)")
    if state == "superseded":
        return ": a newer certificate of the site is in use (pas hub sites)"
    return " (pas hub revoke; pas hub sites lists it)"
