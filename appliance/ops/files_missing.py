"""How a heartbeat says that indexed files are missing from the site's spool, and how the hub
reads the count back: the one phrase both sides share.

Owns: that phrase. May not touch: anything else (the hub imports it; no store, no network).

A lost disk under a restored index (or files removed by hand) leaves index rows whose file
is gone, flagged ``missing``: the site's retrieves of those studies are served partly when
the region cannot give them back. The site's own ``pas_spool_files_missing`` says it to a
Prometheus scraping the appliance; regional ops, who scrape only the hub, see it as one of
the heartbeat's errors and as ``pas_fleet_site_files_missing`` (its count read back here),
as a damaged index is carried (ops/index_check.py). Files flagged damaged (their bytes no
longer those received) are said and read back the same way (``pas_fleet_site_files_damaged``).
"""

from __future__ import annotations

import re

from appliance.words import counted

_SAID = re.compile(r"^(\d+) files? missing from the spool\b")
_DAMAGED_SAID = re.compile(r"^(\d+) files? damaged in the spool\b")


def heartbeat_error(count: int) -> str:
    """The heartbeat's error line for ``count`` (> 0) files flagged missing."""
    return (f"{counted(count, 'file')} missing from the spool (flagged: a lost disk or files "
            "removed by hand; their studies are served partly unless the region gives them "
            "back): pas cache status; pas verify --repair")


def damaged_error(count: int) -> str:
    """The heartbeat's error line for ``count`` (> 0) files flagged damaged (their size or
    SHA-256 no longer the received bytes')."""
    return (f"{counted(count, 'file')} damaged in the spool (flagged: bytes no longer those "
            "received; a failing disk?): pas cache status; pas verify --repair")


def count_said(error: str) -> int:
    """The count a heartbeat error of :func:`heartbeat_error` says (0 for any other)."""
    found = _SAID.match(error)
    return int(found.group(1)) if found else 0


def damaged_said(error: str) -> int:
    """The count a heartbeat error of :func:`damaged_error` says (0 for any other)."""
    found = _DAMAGED_SAID.match(error)
    return int(found.group(1)) if found else 0
