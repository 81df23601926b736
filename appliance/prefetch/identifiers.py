"""What a patient identifier or its issuer must be for the region to be searched by it.

Owns: the one check, shared by HL7 intake (:mod:`appliance.prefetch.messages`,
:mod:`appliance.prefetch.merges`), the site's check before a search joins a batch
(:mod:`appliance.prefetch.batch`) and ``pas prefetch patient``. May not touch: anything but
its argument (pure).

Why: PatientID and IssuerOfPatientID are DICOM LO values, at most 64 characters, with no
control character (PS3.5 6.2). An identifier outside that can match no study in the region:
before, such an ID from the RIS was ACKed AA and stored, then searched; its hub refused the
whole batched search (422), so every other patient of the burst failed with it. NUL, CR
(``\\X0D\\``) and the like were stored as the patient ID and the dedup key. Refused where it
enters, the sender is told; refused again before a search, whatever let it in (a worklist,
an older database) fails alone.
"""

from __future__ import annotations

MAX_CHARACTERS = 64  # DICOM LO (PatientID, IssuerOfPatientID)


def control_character(value: str) -> tuple[int, str] | None:
    """The first control character of ``value`` (below space, or DEL) and its 1-based
    position, None when it holds none."""
    for position, char in enumerate(value, 1):
        if char < " " or char == "\x7f":
            return position, char
    return None


def identifier_problem(value: str) -> str | None:
    """Why ``value`` cannot be a patient identifier or issuer the region is searched by, as
    the end of a sentence naming the field (``PID-3 patient identifier`` + this), or None.

    The character is named by its code point, not written: a NUL or CR in an ACK or a log
    line would cut or garble it."""
    if len(value) > MAX_CHARACTERS:
        return (f"is {len(value)} characters: at most {MAX_CHARACTERS} (a DICOM LO value, "
                "which the region is searched by)")
    found = control_character(value)
    if found is not None:
        position, char = found
        if char == "\x1b":  # ISO 2022 code extension (JIS X 0208 kanji, KS X 1001 hangul)
            return (f"holds an ISO 2022 escape sequence (ESC, U+001B at character "
                    f"{position}): an identifier the region is searched by is in the basic "
                    "character set (map this issuer with prefetch.issuer_map)")
        return (f"holds a control character, U+{ord(char):04X} at character {position}: an "
                "identifier is printable text (a DICOM LO value)")
    return None
