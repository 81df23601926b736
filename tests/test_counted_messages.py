"""Counts in the lines people read agree with their noun (``appliance.words.counted``): a job's
last error, an audit detail, a download's error said "1 instance(s)", "1 results", "1 patients".

Each message is built by the code that writes it, without peers: the dicom destination's
refusal and failure text, the Q/R service's audit details over a temporary database, and the
hub download client's search errors over an in-process HTTP transport.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from appliance.config import DicomDestination, ServingSection
from appliance.dispatch.target_types.dicom import DicomTarget, _Refused
from appliance.serving.qr import QueryRetrieveService
from appliance.store import audit
from appliance.store.db import Database
from appliance.store.spool import Spool
from appliance.transfer.download import DownloadError, HubDownloads

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def test_a_dicom_destination_s_errors_count_instances_in_agreement() -> None:
    """The job's last error (``pas queue list``, the status page) said "1 instance(s) not
    sent" and "1 of the 1 instance(s) still to send"."""
    target = DicomTarget("pacs", DicomDestination(kind="dicom", ae_title="CTONLY",
                                                  host="10.1.2.10", port=104), "PAS")

    def refused(instances: int) -> str:
        return target._refusal({MR_IMAGE: _Refused(
            {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)},
            {"Abstract Syntax Not Supported"}, instances)})

    assert refused(1).endswith("(answer: Abstract Syntax Not Supported); 1 instance not sent")
    assert refused(3).endswith("; 3 instances not sent")
    one = target._failures([("1.2.3", 0xA700)], 1)
    assert one == ("pacs answered a C-STORE failure status for 1 of the 1 instance still to "
                   "send: 1.2.3 (0xA700)")
    assert "for 1 of the 2 instances still to send" in target._failures([("1.2.3", 0xA700)], 2)


def test_query_and_retrieve_audit_details_count_in_agreement(tmp_path: Path) -> None:
    """A C-FIND with one match was audited "1 results", a C-MOVE of one instance
    "1 instances"; zero and several keep the plural."""
    db = Database(tmp_path / "pas.sqlite")
    service = QueryRetrieveService(ServingSection(), db, Spool(tmp_path / "spool"), "PAS")
    for event, count, detail in (("query", 1, None), ("query", 0, None), ("query", 2, None),
                                 ("retrieve", 1, "to VIEWER"), ("retrieve", 5, "to VIEWER")):
        service._audit(event, "VIEWER", "127.0.0.1", "STUDY", "success", count, detail)
    details = [row["detail"] for row in reversed(audit.recent(db))]
    assert details == ["1 result", "0 results", "2 results", "to VIEWER 1 instance",
                       "to VIEWER 5 instances"]


@pytest.mark.parametrize(("patients", "said"), [(1, "search of 1 patient: "),
                                                 (2, "search of 2 patients: ")])
def test_hub_search_errors_count_patients_in_agreement(patients: int, said: str) -> None:
    """The prefetch request's error (``pas prefetch show``) said "search of 1 patients"."""
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="busy")

    def cut(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    wanted = [(f"P{n}", "") for n in range(patients)]
    for handler, rest in ((refuse, "HTTP 500 busy"), (cut, "ConnectError: refused")):
        with httpx.Client(transport=httpx.MockTransport(handler)) as client:
            downloads = HubDownloads("https://hub.example:8443", True, client=client)
            with pytest.raises(DownloadError) as raised:
                downloads.search(wanted)
        assert str(raised.value) == said + rest


def test_an_error_with_no_text_is_said_by_what_its_type_means() -> None:
    """``GET studies: PoolTimeout: `` ended in nothing (httpx's timeouts carry no text)."""
    from appliance.words import error_words

    assert error_words(httpx.PoolTimeout("")) == \
        "PoolTimeout: no connection to it free in time (every one busy)"
    assert error_words(ValueError("bad value")) == "ValueError: bad value"
    assert error_words(RuntimeError()) == "RuntimeError: no detail given"


def test_a_moment_on_the_hub_s_pages_names_its_zone() -> None:
    """The fleet pages said ``09:59:43`` beside tokens in UTC (``...Z``): which zone?"""
    import time

    from appliance.words import local_time

    at = 1_765_000_000.0
    assert local_time(at) == time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(at)) + \
        time.strftime("%Z", time.localtime(at))
    assert local_time(at).rsplit(" ", 1)[1]  # a zone name, not nothing
