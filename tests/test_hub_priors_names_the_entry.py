"""The hub's prior search and priors routes name the patient entry they refuse (review s40,
finding 1; invariant 7).

A patient_id or issuer over 64 characters (DICOM LO), or an entry of the wrong shape, was
answered with one 422 for the whole list: ``patients: must be a list of at most 256 objects
{"patient_id", "issuer"}``. A site whose burst held one such order could not tell which it
was. Now the 422 names the entry and the field (``patients[3].patient_id: at most 64
characters (it has 65)``), as it did for wildcards; an entry of the wrong shape keeps the
list's message, the entry and field named after it. The archive is asked nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.hub import client
from tests.support.priors_archive import Archive, priors_hub

LONG = "A" + "0" * 64  # 65 characters
RULE = {"priors": 2}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real ``pas hub run`` over a stand-in QIDO-RS archive, and an enrolled site."""
    with priors_hub(tmp_path_factory.mktemp("priors-entry"), "SITE-E") as hub:
        yield hub


GOOD = [{"patient_id": f"P{n}", "rule": RULE} for n in range(3)]


@pytest.mark.parametrize("path", ["/api/v1/downloads/search", "/api/v1/downloads/priors"])
@pytest.mark.parametrize(("bad", "detail"), [
    ({"patient_id": LONG, "rule": RULE},
     "patients[3].patient_id: at most 64 characters (it has 65)"),
    ({"patient_id": "P9", "issuer": "H" * 70, "rule": RULE},
     "patients[3].issuer: at most 64 characters (it has 70)"),
    # The wrong shape: the list's message as before, the entry and field named after it.
    ({"patient_id": "", "rule": RULE}, "patients: must be a list of at most 256 objects "
     '{"patient_id", "issuer"} (patients[3].patient_id: must be a non-empty text)'),
    ({"patient_id": 42, "rule": RULE}, "patients: must be a list of at most 256 objects "
     '{"patient_id", "issuer"} (patients[3].patient_id: must be a non-empty text)'),
    ({"patient_id": "P9", "issuer": 7, "rule": RULE},
     "patients: must be a list of at most 256 objects "
     '{"patient_id", "issuer"} (patients[3].issuer: must be a text)'),
    ("P9", 'patients: must be a list of at most 256 objects {"patient_id", "issuer"} '
     "(patients[3]: not an object)"),
])
def test_the_422_names_the_entry_and_the_field(hub: dict[str, Any], path: str, bad: Any,
                                              detail: str) -> None:
    before = len(Archive.seen)
    with client(hub["site"]) as http:
        answer = http.post(path, json={"patients": [*GOOD, bad]})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"] == detail, answer.text
    assert len(Archive.seen) == before  # nothing asked of the archive


@pytest.mark.parametrize(("bad", "detail"), [
    ({"patient_id": LONG, "rule": RULE}, "patients[3].patient_id: at most 64 characters (it "
                                         "has 65)"),
    ({"issuer": "H", "rule": RULE}, 'patients[3]: must be an object {"patient_id", "issuer"?, '
                                    "...} (patients[3].patient_id: must be a non-empty text)"),
])
def test_the_streamed_priors_request_names_the_entry_too(hub: dict[str, Any], bad: Any,
                                                         detail: str) -> None:
    """The NDJSON form (options, then a patient per line) said "must be an object" of a
    65-character ID, and not what was wrong with an entry of the wrong shape."""
    lines = [{}, *GOOD, bad]
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    with client(hub["site"]) as http:
        answer = http.post("/api/v1/downloads/priors", content=body,
                           headers={"Content-Type": "application/x-ndjson"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"] == detail


def test_the_list_itself_is_named_as_before(hub: dict[str, Any]) -> None:
    with client(hub["site"]) as http:
        answer = http.post("/api/v1/downloads/search", json={"patients": {"patient_id": "P"}})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith("patients: must be a list of at most 256")
