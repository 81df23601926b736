"""Cheaper association set-up: a cheap copy of pynetdicom's presentation contexts, and
pydicom's UID check remembered per UID string.

Owns: ``PresentationContext.__deepcopy__``, the listener's shared context list, the cheap
building of an AE's storage contexts, and pydicom's and pynetdicom's validators for the UI
VR. Touches nothing else.

Why: pynetdicom deep-copies the AE's supported contexts for every association it accepts
(``RequestHandler._create_association``) and its requested ones for every association it
opens. PAS supports every storage SOP class with every transfer syntax plus Q/R: 171
contexts naming 6,634 transfer syntax UIDs, and ``copy.deepcopy`` walks each UID object:
~30 ms of CPU under the GIL per association, half of a small study's whole C-STORE time from
a modality that opens one association per study (and as much again for each C-MOVE
sub-association). A context holds only immutable values (str-based UIDs, ints, bools) and one
list; a copy with its own list is exactly what the deep copy produced.

The UID check: every ``UID(...)`` pydicom makes is validated against a regular expression
(through ``re.match``, compile-cache lookup included). A storescu A-ASSOCIATE-RQ names ~500
UIDs, each made into a UID two or three times while pynetdicom decodes and negotiates it:
~8 ms of a 25 ms association set-up here. The answer depends on the string alone, and the
same few hundred standard UIDs come in every association, so it is remembered (bounded);
pydicom still warns or raises on an invalid one exactly as before. ``UID.is_valid`` (the
same regular expression, asked by pynetdicom for each context) is remembered likewise.
Only values that could be a UID (64 characters at most) are remembered: the answer for a
longer one is computed each time. A UID item in a PDU may be 65,535 bytes long, and each
check kept the whole string: an A-ASSOCIATE-RQ naming a 60 kB "UID" left 120 kB behind
(pynetdicom's and pydicom's checks) before it was refused, from anyone who could connect,
up to 8,192 of them per check: ~1 GB (invariant 8).

The storage contexts: the listener supports ~180 storage SOP classes with ~40 transfer
syntaxes each, twice (ingest, then serving adds the SCU and SCP roles for C-GET).
pynetdicom's ``add_supported_context`` makes and checks each transfer syntax UID again for
every class, and on the second pass compares each with each: ~29,000 UIDs, 45-60 ms of CPU
at every daemon start (measured with the remembered checks below; a profiler made it look
like 0.26 s). :func:`add_supported_contexts` checks the list once and gives each class its
own copy: 3-4 ms.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from pydicom import uid as pydicom_uid
from pydicom import valuerep
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.presentation import PresentationContext

_installed = False
# The longest UID (PS3.5 9.1): anything longer is invalid, and is not remembered.
UID_MAX_LENGTH = 64


class SharedContexts(list[PresentationContext]):
    """A listener's supported contexts, shared by every association it accepts: the
    per-association "deep copy" is a new list of the same context objects. Negotiation only
    reads them (``presentation.negotiate_as_acceptor`` makes new result contexts; nothing
    else of pynetdicom's touches an acceptor's supported contexts), and even the cheap copy
    of each of PAS's 176 contexts was 9 % of the CPU of an association carrying one image."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return list(self)


def _copy_context(self: PresentationContext, memo: dict[int, Any]) -> PresentationContext:
    clone = copy.copy(self)
    clone._transfer_syntax = list(self._transfer_syntax)
    return clone


def add_supported_contexts(ae: AE, sop_classes: Iterable[str], transfer_syntaxes: list[str],
                           scu_role: bool | None = None, scp_role: bool | None = None) -> None:
    """What ``ae.add_supported_context(sop_class, transfer_syntaxes, scu_role, scp_role)``
    does for each class, with the transfer syntaxes checked once. A class already supported
    with exactly these syntaxes gets the roles (as pynetdicom would); one supported with
    others goes through pynetdicom's own path (it extends the list)."""
    template = PresentationContext()
    template.transfer_syntax = list(transfer_syntaxes)  # pynetdicom's checks, once
    template.scu_role = scu_role
    template.scp_role = scp_role
    supported: dict[Any, PresentationContext] = ae._supported_contexts
    for sop_class in sop_classes:
        uid = pydicom_uid.UID(sop_class)
        existing = supported.get(uid)
        if existing is None:
            context = copy.copy(template)
            context._transfer_syntax = list(template._transfer_syntax)
            context.abstract_syntax = uid  # pynetdicom's check of the abstract syntax
            supported[uid] = context
        elif existing._transfer_syntax == template._transfer_syntax:
            existing.scu_role = scu_role
            existing.scp_role = scp_role
        else:
            ae.add_supported_context(uid, transfer_syntaxes, scu_role, scp_role)


def _remembering(validator: Any) -> Any:
    remembered = lru_cache(maxsize=8192)(validator)

    def validate_ui(vr: str, value: Any) -> tuple[bool, str]:
        if (type(value) is str or type(value).__name__ == "UID") \
                and len(value) <= UID_MAX_LENGTH:
            return remembered(vr, str(value))
        return validator(vr, value)

    validate_ui.pas_remembering = True  # type: ignore[attr-defined]
    return validate_ui


def _remembering_pynetdicom(validator: Any) -> Any:
    @lru_cache(maxsize=8192)
    def remembered(value: str, enforced: bool) -> tuple[bool, str]:
        return validator(pydicom_uid.UID(value))

    def validate_ui(value: Any) -> tuple[bool, str]:
        if isinstance(value, str) and len(value) <= UID_MAX_LENGTH:
            return remembered(str(value), bool(pynetdicom_config.ENFORCE_UID_CONFORMANCE))
        return validator(value)

    validate_ui.pas_remembering = True  # type: ignore[attr-defined]
    return validate_ui


def install() -> None:
    """Idempotent; process-wide."""
    global _installed
    if not _installed and hasattr(PresentationContext(), "_transfer_syntax"):
        PresentationContext.__deepcopy__ = _copy_context  # type: ignore[attr-defined]
        _installed = True
    validator = valuerep.VALIDATORS.get("UI")
    if validator is not None and not getattr(validator, "pas_remembering", False):
        valuerep.VALIDATORS["UI"] = _remembering(validator)
    # pynetdicom's own check of every UID it decodes or sets (``set_uid``), asked several
    # times per UID of an A-ASSOCIATE-RQ: an import and a UID made per call, 7 % of the CPU
    # of an association that carries one image. Its answer depends on the string and on
    # ENFORCE_UID_CONFORMANCE, both in the key.
    pynetdicom_ui = pynetdicom_config.VALIDATORS.get("UI")
    if pynetdicom_ui is not None and not getattr(pynetdicom_ui, "pas_remembering", False):
        pynetdicom_config.VALIDATORS["UI"] = _remembering_pynetdicom(pynetdicom_ui)
    is_valid = pydicom_uid.UID.__dict__.get("is_valid")
    if isinstance(is_valid, property) and not getattr(is_valid.fget, "pas_remembering", False):
        remembered = lru_cache(maxsize=8192)(lambda text: is_valid.fget(pydicom_uid.UID(text)))

        def valid(self: pydicom_uid.UID) -> bool:
            if len(self) > UID_MAX_LENGTH:
                return bool(is_valid.fget(self))
            return bool(remembered(str(self)))

        valid.pas_remembering = True  # type: ignore[attr-defined]
        pydicom_uid.UID.is_valid = property(valid)  # type: ignore[method-assign,assignment]
