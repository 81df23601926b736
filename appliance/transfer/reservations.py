"""Bucket reservations, the appliance's side (docs/protocol.md, "A busy hub"): when a bucket
PUT first asks the hub to hold its bytes.

Owns: remembering that the hub said busy lately (and that a hub has no reservation call),
and the reservation request itself. May not touch: retries, slots, what a PUT sends (the
hub client's, ``client.py``, which calls :meth:`Reservations.before_put` inside each PUT
attempt, once its connection slot is held).

Why: a busy hub answers a bucket PUT ``503`` before reading its body, but httpx does not
implement ``Expect: 100-continue``: it sends the whole body whatever the server answered
first, so a refused 6 MiB bucket crossed the site's slow uplink anyway, and after a regional
outage 40 sites catching up kept filling the hub's link with refused bodies exactly while
it was overloaded. A reservation is a request of a few hundred bytes; refused, the body is
never sent. (A hub that closed the connection after its early 503 would spare the body too,
but the client's kernel would then see a reset that can discard that very answer.)

Only while the hub said busy within :data:`BUSY_MEMORY_S`: a hub with room pays no extra
round trip per bucket.
"""

from __future__ import annotations

import logging
import time

import httpx

log = logging.getLogger("pas.transfer.client")

API = "/api/v1"
# After a busy answer, each bucket PUT reserves its bytes first for this long: a hub busy
# once is likely busy again soon (an outage's catch-up lasts minutes), and the reservation's
# round trip (70 ms on a regional line, against seconds for a bucket) is all a refusal costs.
BUSY_MEMORY_S = 120.0
# A hub without reservations (an older one: 404 or 405) is not asked again for this long:
# its PUTs go as before meanwhile (it may be upgraded while this daemon runs).
NO_RESERVATIONS_S = 3600.0


class Reservations:
    """Shared by every PUT of one hub client (thread-safe: two floats, each written
    whole)."""

    def __init__(self, http: httpx.Client) -> None:
        self._http = http
        self._busy_at = float("-inf")  # monotonic seconds of the last busy answer
        self._none_until = float("-inf")  # the hub is known to have no reservations till

    def busy(self) -> None:
        """The hub answered busy (503 with Retry-After), to a PUT or a reservation."""
        self._busy_at = time.monotonic()

    def before_put(self, transfer_id: str, index: int, size: int) -> httpx.Response | None:
        """If the hub said busy lately, ask it to hold ``size`` bytes for bucket ``index``
        of ``transfer_id`` (``POST .../reservation``). The answer when it is a 5xx (busy:
        the caller raises it and retries after its Retry-After, the body unsent); else None
        and the PUT goes: granted, it uses the reservation; any 4xx is left for the PUT to
        answer with its own meaning; a 404 not naming the transfer or a 405 (an older hub)
        means no reservations there."""
        now = time.monotonic()
        if now - self._busy_at > BUSY_MEMORY_S or now < self._none_until:
            return None
        response = self._http.post(f"{API}/transfers/{transfer_id}/buckets/{index}/reservation",
                                   json={"bytes": size})
        if response.status_code >= 500:
            return response
        if response.status_code == 405 or (response.status_code == 404 and
                                            _error(response) != "unknown_transfer"):
            self._none_until = now + NO_RESERVATIONS_S
            log.info("hub has no bucket reservations (HTTP %d): its PUTs go without, as "
                     "before", response.status_code)
        return None


def _error(response: httpx.Response) -> object:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None
