"""How a count reads: ``1 study``, ``2 studies``, ``0 files``; how long ago: ``3 days ago``;
how the appliance is titled; how an error reads (:func:`error_words`); how a moment reads
(:func:`local_time`).

Owns: the agreement of a noun with its count and how an age reads (:func:`ago`), for every
line people read (CLI output, the status page, audit details, doctor's findings). May not
touch: anything else (no imports from the rest of PAS, so any layer can use it).
"""

from __future__ import annotations


def counted(n: float, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in agreement: the singular for exactly one, else ``plural`` (by
    default ``noun + "s"``; give it for study/studies, series/series...)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def ago(seconds: float) -> str:
    """An age as ``pas doctor`` and the status page say it: ``12 min ago``, ``5 h ago``,
    ``3 days ago`` (days past two: a backup's age is read in days)."""
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def appliance_title(site: str, ae_title: str | None = None) -> str:
    """What ``pas status`` and the status page are titled: ``PAS CHU-NORD (AE PAS)``. The
    site is left out while it is the default ``PAS`` (both read ``PAS PAS (PAS)`` on a fresh
    install, which looked like a bug); the AE title is labelled as such."""
    title = "PAS" if site in ("", "PAS") else f"PAS {site}"
    return f"{title} (AE {ae_title})" if ae_title else title


# Errors whose text is empty (httpx's timeouts): what their name means, said instead.
_SILENT_ERRORS = {
    "PoolTimeout": "no connection to it free in time (every one busy)",
    "ConnectTimeout": "no answer to the connection within its timeout",
    "ReadTimeout": "no answer within its timeout",
    "WriteTimeout": "could not send within its timeout",
}


def error_words(exc: BaseException) -> str:
    """``Type: text``, as the logs and ``last_error`` say an error; for one whose text is
    empty (``httpx.PoolTimeout()``), what its type means: ``GET studies: PoolTimeout: ``
    ended in nothing."""
    name, text = type(exc).__name__, str(exc).strip()
    return f"{name}: {text or _SILENT_ERRORS.get(name, 'no detail given')}"


def local_time(at: float) -> str:
    """A moment in this host's time, its zone named: ``2026-12-06 09:59:43 CET``. The hub's
    pages said ``09:59:43`` beside tokens listed in UTC (``...Z``), and a region's ops, or
    a site in another zone, could not tell which."""
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(at))
