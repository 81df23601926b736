"""A background loop failing at every pass says so without flooding the journal
(appliance/logs.py ``LoopFailures``): the first failure whole, the same one again as a count
at most every ``every_s``, another error whole, and the pass that works again says so."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from appliance.logs import LoopFailures


def _fail(failures: LoopFailures, exc: Exception) -> None:
    try:
        raise exc
    except Exception as caught:  # noqa: BLE001 - as the loops catch it
        failures.failed(caught)


def test_a_loop_failing_every_pass_logs_its_traceback_once_then_counts(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("pas.test.loop")
    clock = [1000.0]
    failures = LoopFailures(log, "routing pass failed", every_s=300, clock=lambda: clock[0])
    damaged = sqlite3.DatabaseError("database disk image is malformed")
    with caplog.at_level(logging.INFO, logger="pas.test.loop"):
        for _ in range(150):  # five minutes of a pass every 2 s
            _fail(failures, damaged)
            clock[0] += 2
        _fail(failures, damaged)  # 300 s after the first: one line with the count
        _fail(failures, OSError("No space left on device"))  # another error: whole
        failures.worked()
    records = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert records[0] == ("ERROR", "routing pass failed", True)
    assert records[1][0] == "WARNING" and not records[1][2]
    assert records[1][1].startswith("routing pass failed again, 150 times in 300 s "
                                    "(DatabaseError: database disk image is malformed)")
    assert records[2] == ("ERROR", "routing pass failed", True)
    assert "No space left on device" in caplog.records[2].exc_text  # type: ignore[operator]
    assert records[3] == ("INFO", "routing pass failed: works again after 152 failed passes",
                          False)
    assert len(records) == 4
    failures.worked()  # nothing failed since: nothing to say
    assert len(caplog.records) == 4
