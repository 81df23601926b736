"""How a count reads: ``1 study``, ``2 studies``, ``0 files``.

Owns: the agreement of a noun with its count, for every line people read (CLI output, the
status page, audit details, doctor's findings). May not touch: anything else (no imports
from the rest of PAS, so any layer can use it).
"""

from __future__ import annotations


def counted(n: float, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in agreement: the singular for exactly one, else ``plural`` (by
    default ``noun + "s"``; give it for study/studies, series/series...)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
