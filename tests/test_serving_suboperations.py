"""How one sub-operation's C-STORE status is counted and worded in a retrieve's audit row.

The peers in tests/test_serving_retrieve_audit.py answer Success, 0xA700 and 0xC000 and
refuse presentation contexts; no DCMTK tool answers a warning, so the rest of the statuses
are checked here, on the tally itself (no network, nothing stubbed).
"""

from __future__ import annotations

import pytest

from appliance.serving.suboperations import SubOperationTally, status_meaning


@pytest.mark.parametrize(("status", "counted"), [
    (0x0000, "completed"),
    (0xB000, "warning"), (0xB006, "warning"), (0xB007, "warning"),
    # General warnings: pynetdicom counts them as warnings in the final C-MOVE/C-GET
    # response, and the audit row must agree with what the viewer was told.
    (0x0107, "warning"), (0x0116, "warning"),
    (0xA700, "failed"), (0xA7FF, "failed"), (0xA900, "failed"), (0xC000, "failed"),
    (0x0122, "failed"), (0x0211, "failed"),
    # Cancel and Pending are no C-STORE outcome; a status nobody defined neither: not stored.
    (0xFE00, "failed"), (0xFF00, "failed"), (0x1234, "failed"),
])
def test_each_status_is_counted_as_pynetdicom_counts_it(status: int, counted: str) -> None:
    tally = SubOperationTally(total=1)
    tally.record_status(status)
    assert {"completed": tally.completed, "warning": tally.warning,
            "failed": tally.failed} == {k: int(k == counted)
                                        for k in ("completed", "warning", "failed")}


def test_warnings_are_delivered_and_said_in_the_detail() -> None:
    tally = SubOperationTally(total=3, finished=True)
    tally.record_status(0x0000)
    tally.record_status(0xB000, "VR coerced ")
    tally.record_status(0xB007)
    assert tally.outcome("VIEWER") == "success"
    assert tally.detail("C-GET") == ("C-GET: 1 completed, 0 failed, 2 warning (stored with "
                                     "warnings, first 0xB000 coercion of data elements: VR "
                                     "coerced)")


def test_the_first_failure_is_named_with_its_count() -> None:
    tally = SubOperationTally(total=10, finished=True)
    for _ in range(7):
        tally.record_status(0x0000)
    tally.record_status(0xA702)
    tally.record_failure("no C-STORE response")
    tally.record_status(0xC001)
    assert tally.outcome("VIEWER") == ("failure: 3 of 10 instances not stored by VIEWER "
                                       "(0xA702 out of resources)")
    assert tally.detail("C-MOVE to VIEWER") == "C-MOVE to VIEWER: 7 completed, 3 failed, 0 warning"


def test_a_cancel_stays_cancelled_and_counts_what_was_not_sent() -> None:
    tally = SubOperationTally(total=5, cancelled=True)
    tally.record_status(0x0000)
    tally.record_status(0xA700)
    assert tally.outcome("VIEWER") == "cancelled"
    assert tally.detail("C-MOVE to VIEWER") == ("C-MOVE to VIEWER: 1 completed, 1 failed, "
                                                "0 warning, 3 not sent")


def test_status_meanings() -> None:
    assert status_meaning(0xA700) == "0xA700 out of resources"
    assert status_meaning(0x0122) == "0x0122 SOP class not supported"
    assert status_meaning(0x0212) == "0x0212 mistyped argument"  # pynetdicom's words
    assert status_meaning(0x1234) == "0x1234 unknown status"
