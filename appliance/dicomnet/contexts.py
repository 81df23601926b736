"""A cheap copy of pynetdicom's presentation contexts.

Owns: ``PresentationContext.__deepcopy__``. Touches nothing else.

Why: pynetdicom deep-copies the AE's supported contexts for every association it accepts
(``RequestHandler._create_association``) and its requested ones for every association it
opens. PAS supports every storage SOP class with every transfer syntax plus Q/R: 171
contexts naming 6,634 transfer syntax UIDs, and ``copy.deepcopy`` walks each UID object:
~30 ms of CPU under the GIL per association, half of a small study's whole C-STORE time from
a modality that opens one association per study (and as much again for each C-MOVE
sub-association). A context holds only immutable values (str-based UIDs, ints, bools) and one
list; a copy with its own list is exactly what the deep copy produced.
"""

from __future__ import annotations

import copy
from typing import Any

from pynetdicom.presentation import PresentationContext

_installed = False


def _copy_context(self: PresentationContext, memo: dict[int, Any]) -> PresentationContext:
    clone = copy.copy(self)
    clone._transfer_syntax = list(self._transfer_syntax)
    return clone


def install() -> None:
    """Idempotent; process-wide."""
    global _installed
    if not _installed and hasattr(PresentationContext(), "_transfer_syntax"):
        PresentationContext.__deepcopy__ = _copy_context  # type: ignore[attr-defined]
        _installed = True
