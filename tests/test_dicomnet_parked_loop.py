"""A parked association loop says it is paused, whatever was written meanwhile
(appliance/dicomnet/reactor.py ``association_run_reactor``).

pynetdicom's ``release()`` and ``send_*()`` clear the loop's checkpoint and spin until the loop
says ``_is_paused``. A test's ``release()`` twice spun 300 s (2026-12-05 and 2026-12-06) with
the loop parked at the checkpoint and ``_is_paused`` False; what wrote False is not found.
The parked loop now says True again at each tick: a release then goes through within one.
Here the unknown write is made on purpose, against a real DCMTK storescp."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from appliance import dicomnet
from tests.support.peers import StoreSCP, wait_for


def test_a_release_goes_through_when_the_parked_loop_was_said_unpaused(
        tmp_path: Path) -> None:
    dicomnet.install()
    scp = StoreSCP(tmp_path / "node", ae_title="NODE").start()
    released = threading.Event()
    try:
        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="NODE")
        assert assoc.is_established
        assoc._reactor_checkpoint.clear()  # as a send_*() does: the loop parks
        wait_for(lambda: getattr(assoc, "_pas_parked", False), 5, interval=0.001,
                 what="the loop parked at its checkpoint")
        assoc._is_paused = False  # the write whose author is not found

        def release() -> None:
            assoc.release()
            released.set()

        threading.Thread(target=release, daemon=True).start()
        started = time.monotonic()
        assert released.wait(10), "release() spun on a parked loop said unpaused"
        assert time.monotonic() - started < 5
        assert assoc.is_released and not assoc.is_established
    finally:
        if not released.is_set():  # let the spinning thread go, whatever the outcome
            assoc._is_paused = True
        scp.stop()
