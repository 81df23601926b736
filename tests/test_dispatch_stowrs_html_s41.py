"""Destination kind ``stowrs``: a 200 whose body is not DICOM JSON is not "all stored".

A STOW-RS archive behind a single sign-on proxy (or a web app that answers its index.html
for any path) answers the POST 200 ``text/html``, "Please sign in". The target read any body
it could not parse as an empty one, and an empty 200 counts as every instance stored (PS3.18:
the status says it; some archives send no Store Instances Response): every instance was
marked sent and the job done, and the archive held nothing (review s41, F2). Now only a body
that is truly empty (or DICOM JSON listing nothing) counts so; anything else is a failed
attempt, retried, whose error names the Content-Type and the body's first bytes.

The archive is a small real HTTP server on loopback: it answers the login page until the
test "signs in", then stores what it is sent (answering each instance in its Referenced SOP
Sequence). PAS is the real daemon, fed by DCMTK's storescu.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.support.configs import BACKOFF_QUICK, everything_to_stowrs
from tests.support.dispatch_steps import start_pas
from tests.support.peers import read_rows, storescu, wait_for
from tests.support.stowrs_archive import StowArchive
from tests.test_routing import CT_PATIENT

LOGIN_PAGE = b"<!doctype html>\n<html><body>Please sign in</body></html>"


class LoginPageArchive(StowArchive):
    """Answers each STOW-RS POST 200 ``text/html`` (the login page) until ``signed_in`` is
    set, then stores the instances and lists them as referenced. ``pages``: the POSTs the
    page answered; ``stored``: the SOP Instance UIDs stored."""

    def __init__(self, answer: str = "json") -> None:
        self.signed_in = threading.Event()
        self.pages = 0
        self.format = answer
        super().__init__()

    def answer(self, uids: list[str]) -> tuple[bytes, str]:
        if not self.signed_in.is_set():
            with self.lock:
                self.pages += 1
            return LOGIN_PAGE, "text/html; charset=utf-8"
        listed = super().answer(uids)
        if self.format == "xml":  # PS3.19's Native DICOM Model, the Accept ignored
            items = "".join(f'<Item number="{n}"><DicomAttribute tag="00081155" '
                            f'vr="UI" keyword="ReferencedSOPInstanceUID"><Value '
                            f'number="1">{uid}</Value></DicomAttribute></Item>'
                            for n, uid in enumerate(uids, 1))
            return (f'<?xml version="1.0"?><NativeDicomModel><DicomAttribute '
                    f'tag="00081199" vr="SQ">{items}</DicomAttribute>'
                    "</NativeDicomModel>".encode(), "application/dicom+xml")
        if self.format == "blank":
            return b"\r\n", "text/plain"
        return listed


def _assert_all_stored(archive: StowArchive, database: Path) -> None:
    """The archive stored every instance of the study, each marked sent."""
    expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in CT_PATIENT}
    assert set(archive.stored) == expected
    assert read_rows(database, "SELECT count(*) AS n FROM job_instances "
                               "WHERE sent_at IS NOT NULL")[0]["n"] == len(expected)


def test_a_login_page_answered_200_is_not_taken_for_stored(pas_factory: Any,
                                                           tmp_path: Path) -> None:
    """Before the fix the first POST's login page ended the job ``done`` with every
    instance marked sent (the archive never stored one)."""
    archive = LoginPageArchive()
    try:
        config = everything_to_stowrs(tmp_path / "appliance.toml", archive.url,
                                      queue="max_attempts = 50\n" + BACKOFF_QUICK)
        pas = start_pas(pas_factory, config)
        database = pas.home / "pas.sqlite"
        storescu(CT_PATIENT, pas.port)

        def job() -> dict[str, Any] | None:
            rows = read_rows(database, "SELECT * FROM jobs")
            return dict(rows[0]) if rows else None

        wait_for(lambda: (j := job()) is not None and (j["last_error"] or j["state"] == "done"),
                 60, what="the job's first attempt over")
        first = job()
        assert first is not None
        assert first["state"] in ("pending", "running"), first  # retried, not done
        error = first["last_error"]
        assert "HTTP 200" in error and "not DICOM JSON" in error, error
        assert "Content-Type 'text/html; charset=utf-8'" in error, error
        assert "Please sign in" in error and "\\n" in error and "\n" not in error, error
        assert read_rows(database, "SELECT count(*) AS n FROM job_instances "
                                   "WHERE sent_at IS NOT NULL")[0]["n"] == 0
        assert archive.stored == []

        archive.signed_in.set()  # the proxy's session put right: the archive answers now
        wait_for(lambda: (j := job()) is not None and j["state"] == "done", 60,
                 what="the job delivered once the archive answers")
        assert archive.pages >= 1
        _assert_all_stored(archive, database)
    finally:
        archive.stop()


@pytest.mark.parametrize("answer", ["xml", "blank"])
def test_a_200_in_dicom_xml_or_blank_is_all_stored(pas_factory: Any, tmp_path: Path,
                                                   answer: str) -> None:
    """A 200 says every instance was stored (PS3.18). An archive that answers its Store
    Instances Response in DICOM XML, ignoring the Accept, or with a body of whitespace, was
    taken for a failed attempt by the first version of this fix: each job re-sent the study
    max_attempts times, then failed. One attempt, done, every instance marked sent."""
    archive = LoginPageArchive(answer)
    archive.signed_in.set()
    try:
        pas = start_pas(pas_factory,
                        everything_to_stowrs(tmp_path / "appliance.toml", archive.url))
        database = pas.home / "pas.sqlite"
        storescu(CT_PATIENT, pas.port)
        wait_for(lambda: [r["state"] for r in read_rows(database, "SELECT state FROM jobs")]
                 == ["done"], 60, what="the job done")
        [job] = read_rows(database, "SELECT attempts, last_error FROM jobs")
        assert (job["attempts"], job["last_error"]) == (1, None)
        _assert_all_stored(archive, database)
    finally:
        archive.stop()
