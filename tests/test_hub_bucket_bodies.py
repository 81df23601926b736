"""The hub's bucket budget with reservations (appliance/hub/bucket_bodies.py), on a clock the
test moves: every byte a reservation or a PUT takes is given back exactly once, whichever way
it ends (used by its PUT, renewed, lapsed, or too small for the PUT that came). The real hub
and appliance around it: tests/test_hub_reservations.py."""

from __future__ import annotations

from appliance.hub.bucket_bodies import BucketBodies


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(bodies: BucketBodies) -> tuple[int, int, int, int]:
    now = bodies.now()
    return now.held, now.bodies, now.reservations, now.reserved


def test_a_reservation_is_used_by_its_put_renewed_or_lapses_and_each_byte_comes_back() -> None:
    clock = Clock()
    bodies = BucketBodies(1000, reservation_s=30, per_site=2, clock=clock)
    assert bodies.reserve("A", "t1", 0, 400) == "reserved"
    assert bodies.reserve("A", "t1", 1, 300) == "reserved"
    assert bodies.reserve("A", "t1", 2, 10) == "too_many"  # per_site: nothing taken
    assert bodies.reserve("B", "t2", 0, 301) == "busy"  # 700 held of 1000
    assert bodies.take(301, "B") is False  # a PUT without one: refused the same
    assert state(bodies) == (700, 0, 2, 700)
    assert bodies.now().refused == {"B": 2} and bodies.now().refused_reservations == {"B": 1}

    # Its PUT declares less than reserved: holds what it declared, the rest comes back.
    assert bodies.claim("A", "t1", 0, 350) is True
    assert state(bodies) == (650, 1, 1, 300)
    bodies.give_back(350)
    assert state(bodies) == (300, 0, 1, 300)
    assert bodies.claim("A", "t1", 0, 350) is False  # used once: the next PUT takes

    # Renewed at 20 s (a new deadline, the old bytes given back first), then the other
    # site's reservation made at 25 s: at 45 s neither has lapsed, at 51 s the renewed has.
    clock.now += 20
    assert bodies.reserve("A", "t1", 1, 200) == "reserved"
    clock.now += 5
    assert bodies.reserve("B", "t2", 0, 100) == "reserved"
    assert state(bodies) == (300, 0, 2, 300)
    clock.now += 20
    assert state(bodies) == (300, 0, 2, 300)
    clock.now += 6
    assert state(bodies) == (100, 0, 1, 100)
    assert bodies.claim("A", "t1", 1, 200) is False  # lapsed: the PUT takes as one without

    # A PUT declaring more than its reservation: the reservation is given back, no claim.
    assert bodies.claim("B", "t2", 0, 101) is False
    assert state(bodies) == (0, 0, 0, 0)
    clock.now += 60
    assert state(bodies) == (0, 0, 0, 0)
