"""When a failed job is tried again: exponential backoff with jitter, via tenacity.

The queue is durable, so the delay is computed here and stored as ``next_attempt_at``
rather than slept in a retry loop; tenacity's wait strategy supplies the curve.
"""

from __future__ import annotations

import random

from tenacity import RetryCallState, wait_exponential, wait_random

from appliance.config import QueueSection


def next_delay(queue: QueueSection, attempts: int) -> float | None:
    """Seconds until the next attempt after ``attempts`` failures; None once exhausted."""
    if attempts >= queue.max_attempts:
        return None
    return _jittered(attempts, queue.backoff_initial_s, queue.backoff_max_s)


def _jittered(attempt_number: int, initial_s: float, max_s: float) -> float:
    """tenacity's exponential curve with jitter: ``initial_s`` x 2^(n-1), plus up to
    ``max(initial_s, 0.1)``, at most ``max_s``.

    Written as tenacity's two parts (``wait_exponential`` + ``wait_random``), which is what
    ``wait_exponential_jitter`` computes: that one's ``initial`` is deprecated since tenacity
    9.2 for a ``multiplier`` that the releases pyproject.toml allows (>= 8.2) do not take."""
    wait = wait_exponential(multiplier=initial_s, max=max_s) + wait_random(0, max(initial_s, 0.1))
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt_number
    return min(float(wait(state)), max_s)


# How often a job waiting for room on the spool tries again (at most queue.backoff_max_s):
# eviction runs every cache.evict_interval_s (30 s by default), a copy is let go in seconds.
ROOM_RETRY_S = 60.0


def room_delay(queue: QueueSection) -> float:
    """Seconds until a job that found no room for a copy tries again (not counted)."""
    return min(queue.backoff_max_s, max(queue.backoff_initial_s, ROOM_RETRY_S))


def trust_delay(queue: QueueSection) -> float:
    """Seconds until a job that met a refused certificate tries again (not counted): as
    :func:`room_delay`. Only a person cures it, and a restart (which makes such jobs due at
    once) is how the cure takes effect; the tries in between only show it still holds."""
    return room_delay(queue)


def busy_delay(queue: QueueSection, retry_after_s: float) -> float:
    """Seconds until a job a busy destination turned away tries again (not counted): the
    time it asked for, at least ``backoff_initial_s``, and up to a quarter more so that the
    jobs it turned away do not all come back at once."""
    base = max(queue.backoff_initial_s, retry_after_s)
    return base + random.uniform(0, base / 4)


def link_delay(queue: QueueSection, down_for_s: float) -> float:
    """Seconds until a job waiting for its destination's link tries again, given how long the
    link has been down: a quarter of that, at least ``backoff_initial_s`` and at most
    ``backoff_max_s``, with jitter so that the jobs of a backlog do not try all at once.
    Such attempts are not counted (``jobs.wait_for_link``), so the curve follows the outage
    rather than the attempts; the link's return makes them due at once
    (``jobs.wake_waiting_for_link``, from the heartbeat)."""
    base = min(queue.backoff_max_s, max(queue.backoff_initial_s, down_for_s / 4))
    return min(queue.backoff_max_s, base + random.uniform(0, max(queue.backoff_initial_s, 0.1)))


def exponential_delay(attempts: int, initial_s: float, max_s: float) -> float:
    """Seconds until the next try after ``attempts`` failures, on tenacity's exponential
    curve with jitter, at most ``max_s``: for retries whose state is a row of their own (a
    Storage Commitment report, appliance/ingest/commitment.py), not a job of the queue."""
    return _jittered(max(1, attempts), initial_s, max_s)
