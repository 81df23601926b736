"""When a failed job is tried again: exponential backoff with jitter, via tenacity.

The queue is durable, so the delay is computed here and stored as ``next_attempt_at``
rather than slept in a retry loop; tenacity's wait strategy supplies the curve.
"""

from __future__ import annotations

from tenacity import RetryCallState, wait_exponential_jitter

from appliance.config import QueueSection


def next_delay(queue: QueueSection, attempts: int) -> float | None:
    """Seconds until the next attempt after ``attempts`` failures; None once exhausted."""
    if attempts >= queue.max_attempts:
        return None
    wait = wait_exponential_jitter(initial=queue.backoff_initial_s, max=queue.backoff_max_s,
                                   jitter=max(queue.backoff_initial_s, 0.1))
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempts
    return min(float(wait(state)), queue.backoff_max_s)
