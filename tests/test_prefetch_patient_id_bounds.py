"""A patient ID the region cannot be searched by fails alone, not its burst (review s40,
finding 1; invariant 7): real peers.

A real Orthanc (DICOMweb plugin) behind a real hub (``pas hub run``, mutual TLS); the site is
an in-process PrefetchService (``tests/test_prefetch_batched.py``'s ``Site``). A patient ID
over 64 characters (DICOM LO) reached the hub in a batched search or priors request; the
hub refused the whole request with a 422 ("patients: must be a list of at most 256
objects..."), and every patient of the burst failed with it, at every attempt. HL7 intake
refuses such an ID now (tests/test_hl7_bad_input_refused.py), but a request may still hold
one (a worklist, a request stored before): the site refuses it before the batch, as it does
a wildcard, naming the field; the other patients are fetched at their first attempt. A
control character (which no DICOM LO may hold, so no study can match) fails the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hub import HubProcess
from tests.test_prefetch_batched import PATIENTS, Site, dicomweb_region
from tests.test_prefetch_priors import warm_site

pytestmark = pytest.mark.root

LONG = "A" + "0" * 64  # 65 characters: one past DICOM LO
CONTROL = "A04\x0083"


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with dicomweb_region(tmp_path_factory.mktemp("id-bounds"),
                         env={"PAS_HUB_LIMITS__LANE_JOIN_WAIT_S": "1"}) as made:
        yield made


def assert_alone(site: Site, rows: list[dict[str, Any]], region: dict[str, Any],
                 refused: dict[str, str]) -> None:
    """The burst's good patients fetched at their first attempt; each of ``refused``'s rows
    (the last ones) failed at its first, its last_error holding the text given."""
    good = rows[:len(PATIENTS)]
    site.assert_fetched(good, region["priors"], PATIENTS)
    assert all(row["attempts"] == 1 for row in good)
    for row, (patient, error) in zip(rows[len(PATIENTS):], refused.items(), strict=True):
        assert row["patient_id"] == patient
        assert row["state"] == "failed" and row["attempts"] == 1, row
        assert error in row["last_error"], row["last_error"]
        assert "422" not in row["last_error"]


def test_a_patient_id_over_64_characters_fails_alone_in_a_batched_search(
        region: dict[str, Any], tmp_path: Path) -> None:
    hub: HubProcess = region["hub"]
    site = Site(hub, tmp_path / "pas", "SITE-LONG", env={"PAS_PREFETCH__MAX_ATTEMPTS": "1"})
    site.service.fetcher.priors_route = False  # the batched search (two-step path)
    rows = site.run(site.order((*PATIENTS, LONG, CONTROL)))
    assert_alone(site, rows, region, {
        LONG: "patient_id is 65 characters: at most 64",
        CONTROL: "patient_id holds a control character, U+0000 at character 4"})
    assert site.service.fetcher.searcher.requests >= 1


def test_a_patient_id_over_64_characters_fails_alone_in_a_priors_request(
        region: dict[str, Any], tmp_path: Path) -> None:
    hub: HubProcess = region["hub"]
    site = warm_site(hub, tmp_path / "pas", "SITE-LONG2", PAS_PREFETCH__MAX_ATTEMPTS="1")
    rows = site.run(site.order((*PATIENTS, LONG)))
    assert_alone(site, rows, region, {LONG: "patient_id is 65 characters: at most 64"})
    assert site.service.fetcher.priors.requests >= 1
