"""How the dicom destination reads the C-STORE statuses of a hospital PACS: a pynetdicom
storage SCP (the DCMTK storescp answers Success or a failure only) answering each instance
of a real study, sent by DCMTK storescu through a real `pas run`, with the status chosen
for it."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.support.configs import everything_to, quick_retries
from tests.support.peers import free_port, storescu, wait_for
from tests.test_ingest import sop_uid
from tests.test_routing import CT_PATIENT, jobs_of


class _Node:
    """A storage SCP on 127.0.0.1 answering ``statuses[SOP Instance UID]`` (Success for the
    others) and counting what it received, per SOP Instance UID."""

    ae_title = "STATUSSCP"

    def __init__(self, statuses: dict[str, int]):
        self.statuses = statuses
        self.received: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.port = free_port()
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.received[uid] += 1
        return self.statuses.get(uid, 0x0000)

    def stop(self) -> None:
        self.server.shutdown()


def test_warning_statuses_are_delivered_instances_sent_once(pas_factory,
                                                            tmp_path: Path) -> None:
    """A PACS that stores every instance of a study but answers with warnings: 0xB000
    (PS3.4 B.2.3, coercion of data elements) and the general warnings of PS3.7 C 0x0107
    (attribute list error) and 0x0116 (attribute value out of range), which pynetdicom and
    PAS's own retrieve audit (serving/suboperations.py) count as stored with a warning. The
    job is done at its first attempt and each instance reaches the PACS once. The general
    warnings were taken for failures: the instance sent again at each attempt, stored again
    each time, and the job failed ('failure status ... (0x0116)') once its attempts were
    spent, although the PACS held the whole study."""
    uids = [sop_uid(p) for p in CT_PATIENT]
    node = _Node({uids[0]: 0x0116, uids[1]: 0x0107, uids[2]: 0xB000})
    try:
        config = everything_to(tmp_path / "appliance.toml", node, timeout_s=10,
                               before=quick_retries(3))
        pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
        storescu(CT_PATIENT, pas.port)
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] in (["done"], ["failed"]),
                 60, what="the job finished")
        [job] = jobs_of(pas.home)
        assert (job["state"], job["attempts"], job["last_error"]) == ("done", 1, None), job
        assert node.received == Counter(uids), node.received
        assert pas.log().count("with a C-STORE warning") == 3, "the warnings are not said"
    finally:
        node.stop()
