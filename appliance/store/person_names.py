"""Matching of a person name key against a stored name that holds several values or several
component groups, for :mod:`appliance.store.query` (registered on its connection as an SQL
function).

Owns: PS3.4 C.2.2.3 for PN (a stored attribute of several values matches when any one of
them does) and the component groups of PS3.5 6.2.1.1 (``alphabetic=ideographic=phonetic``):
a key of one group matches a stored name when it matches any one of its groups; a key of
several groups matches when each non-empty group of the key matches the stored group at the
same place. ``*`` and ``?`` are wildcards, as in the SQL forms (LIKE, GLOB) for a plain
name. May not touch: SQL text, the database (a pure function of its arguments).

Why: the index compares a whole stored value, and a stored ``DOE^JOHN\\DOE^J`` (a name given
twice, VM 2) or ``YAMADA^TAROU=山田^太郎=やまだ^たろう`` matched no query of one of its
names: ``PatientName=YAMADA^TAROU`` found nothing.

Also owns what counts in a name, for the SQL forms too (:func:`key_groups`,
``PADDING``): PS3.5 6.2.1.1 lets trailing empty components and their ``^`` be left out, so
``DOE^JANE^^^`` and ``DOE^JANE`` are one name, as ``DOE^JANE==`` is; a key and a stored
group are each compared without their trailing ``^`` (a modality filling names from the
worklist sends ``DOE^JANE^^^``, which ``PatientName=DOE^JANE`` did not find).
"""

from __future__ import annotations

import functools
import re

PN_MATCH = "pas_pn_match"  # the SQL function's name
# Whether a stored value (SQL ``column``) holds several values or component groups: only
# those go through the Python function; the others keep the plain SQL comparison. Written
# as the partial indexes of migration 14 are (store/schema.py), which SQLite then uses.
SEPARATED = "(instr({column}, '=') > 0 OR instr({column}, char(92)) > 0)"
# The person name columns of the index: (table, column) of each, for the subquery that reads
# the separated rows through their partial index.
# Named with INDEXED BY: without statistics the planner read every name through the name
# index instead (46 ms a query for 100,000 patients).
# PatientName is the study's own (schema 28): each study keeps what its instances carry.
PN_TABLES = {"s.patient_name": ("studies INDEXED BY studies_patient_name_separated",
                                "patient_name"),
             "s.referring_physician": ("studies INDEXED BY studies_referring_separated",
                                       "referring_physician")}
# Whether a stored name holds a letter that case folding turns into ASCII ones (ß -> ss,
# ſ -> s, K (Kelvin) -> k, the ﬀ to ﬆ ligatures): only such a name can match an ASCII key
# that SQLite's NOCASE and LIKE do not see (they fold ASCII letters only, so "strasse^anna"
# missed "Straße^Anna", which "straße^anna" found: review s40, finding 6). Every other
# letter beyond ASCII folds to one beyond ASCII, which an ASCII key cannot match anyway.
# Spliced as it is into the SQL text: migration 28's partial index has this very WHERE,
# which SQLite then uses (it does not for a bound parameter). The list is every such
# character of Python's case folding (checked by tests/test_query_patient_per_study.py).
FOLDS_TO_ASCII = "ßſẞ\u212aﬀﬁﬂﬃﬄﬅﬆ"
FOLDING = "{column} GLOB '*[" + FOLDS_TO_ASCII + "]*'"
# The names of that kind, by their partial index (a few rows: only where it exists; the
# referring physician's is read with the row, which its query reads anyway, no index
# bounding that name).
FOLDING_TABLES = {"s.patient_name": ("studies INDEXED BY studies_patient_name_folding",
                                     "patient_name")}


# A key ending in "*" is compared with the name's empty trailing components written out (four
# "^": PN has five components), so that DOE^* finds DOE as it finds DOE^ (the same name).
# Any other key is compared with the name without them: DOE? does not find DOE^.
PADDING = "^^^^"


def key_groups(key: str) -> list[str]:
    """The component groups of a one-valued person name key as they are compared: each
    without its trailing ``^``, the empty groups at the end left out (``DOE^JANE^^^==`` ->
    ``["DOE^JANE"]``; ``SMITH*=*=*`` -> ``["SMITH*", "*", "*"]``; ``^`` -> ``[]``)."""
    groups = [group.rstrip("^") for group in key.split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return groups


def matches_anything(group: str) -> bool:
    """Whether a key's group matches any group, an absent one too (empty, or ``*`` alone)."""
    return group.replace("*", "") == ""


@functools.lru_cache(maxsize=256)
def _pattern(key: str, case_sensitive: bool) -> re.Pattern[str]:
    """``key`` (``*`` any run, ``?`` one character) as an anchored regular expression."""
    text = key if case_sensitive else key.casefold()
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text)
    return re.compile("".join(parts), re.DOTALL)


def _group_matches(key: str, stored: str, case_sensitive: bool) -> bool:
    """One group of a key (from :func:`key_groups`) against one stored group, as the SQL
    forms of :mod:`appliance.store.query` compare a name of one group."""
    stored = stored.strip().rstrip("^")
    if key.endswith("*"):
        stored += PADDING
    return _pattern(key, case_sensitive).fullmatch(
        stored if case_sensitive else stored.casefold()) is not None


def pn_match(stored: str | None, key: str, case_sensitive: int) -> bool:
    """Whether the stored person name ``stored`` (values separated by ``\\``, component
    groups by ``=``) matches the one-valued ``key``."""
    if not stored:
        return False
    sensitive = bool(case_sensitive)
    wanted = key_groups(key)
    if all(matches_anything(want) for want in wanted):
        return True  # universal matching (the query module sends no such key)
    for value in stored.split("\\"):
        groups = value.split("=")
        if len(wanted) == 1:
            if any(_group_matches(wanted[0], group, sensitive) for group in groups
                   if group.strip().rstrip("^")):
                return True
            continue
        groups += [""] * (len(wanted) - len(groups))
        if all(matches_anything(want) or _group_matches(want, group, sensitive)
               for want, group in zip(wanted, groups, strict=False)):
            return True
    return False
