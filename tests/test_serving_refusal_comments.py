"""A refused C-MOVE/C-GET says why in its Error Comment (0000,0902), DCMTK as the viewer.

Found in review (2026-12-04): pynetdicom sends these refusals itself (0xA801 for a move
destination unknown, down or refusing the association; 0xC511/0xC411 when the handler
refuses the identifier) and the viewer got the bare status: only PAS's audit row said why.
The final response now carries the reason; the daemon keeps serving.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.objects import tiny_ct
from tests.support.peers import DCMTK_ENV, PasProcess, free_port, storescu


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PasProcess, str]]:
    home = tmp_path_factory.mktemp("refusals") / "pas"
    home.mkdir()
    ds = tiny_ct()
    ds.save_as(home / "one.dcm", enforce_file_format=True)
    pas = PasProcess(home, {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        "PAS_SERVING__MOVE_DESTINATIONS":
            f'[{{title = "SWITCHEDOFF", host = "127.0.0.1", port = {free_port()}}}]',
    }).start()
    try:
        storescu(home / "one.dcm", pas.port)
        yield pas, str(ds.StudyInstanceUID)
    finally:
        pas.stop()


def _final(tool: str, pas: PasProcess, keys: list[str], *extra: str,
           out: Path) -> tuple[str, str | None]:
    """(final response's status, its Error Comment or None) as DCMTK's ``tool`` -d prints
    them."""
    args = [tool, "-d", "-aet", "VIEWER", "-aec", "PAS", "-S", *extra]
    if tool == "getscu":  # movescu writes nothing without a port of its own
        args += ["-od", str(out)]
    for key in keys:
        args += ["-k", key]
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([*args, "127.0.0.1", str(pas.port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=60)
    log = result.stdout + result.stderr
    # -d dumps each response: its command set, then the status detail (Error Comment).
    statuses = re.findall(r"DIMSE Status\s*: (0x[0-9a-f]{4}: [^\n]*)", log)
    assert statuses, log[-3000:]
    final = log[log.rindex("DIMSE Status"):]
    comment = re.search(r"\(0000,0902\) LO \[(.*)\]\s+#", final)
    return statuses[-1], comment.group(1) if comment else None


@pytest.mark.parametrize(("tool", "keys", "extra", "status", "comment"), [
    ("movescu", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID={study}"],
     ["-aem", "NOWHERE"], "0xa801", "unknown move destination 'NOWHERE'"),
    ("movescu", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID={study}"],
     ["-aem", "SWITCHEDOFF"], "0xa801",
     "SWITCHEDOFF: destination unreachable or association lost"),
    ("movescu", ["QueryRetrieveLevel=STUDY", "PatientID=*"], ["-aem", "SWITCHEDOFF"],
     "0xc5", "StudyInstanceUID: required for a STUDY-level retrieve"),
    ("getscu", ["QueryRetrieveLevel=STUDY", "PatientID=*"], [],
     "0xc4", "StudyInstanceUID: required for a STUDY-level retrieve"),
    ("getscu", ["QueryRetrieveLevel=SERIES", "SeriesInstanceUID=1.2.3.x"], [],
     "0xc4", "SeriesInstanceUID: '1.2.3.x' is not a UID or a list of UIDs"),
])
def test_a_refused_retrieve_names_why_in_its_error_comment(
        pas: tuple[PasProcess, str], tmp_path: Path, tool: str, keys: list[str],
        extra: list[str], status: str, comment: str) -> None:
    daemon, study = pas
    keys = [k.format(study=study) for k in keys]
    final, said = _final(tool, daemon, keys, *extra, out=tmp_path / "refused")
    assert final.startswith(status), final
    assert said == comment
    assert list((tmp_path / "refused").iterdir()) == []
    # The daemon keeps serving: the one study, retrieved on a new association.
    final, said = _final("getscu", daemon, ["QueryRetrieveLevel=STUDY",
                                            f"StudyInstanceUID={study}"], out=tmp_path / "ok")
    assert final.startswith("0x0000") and said is None, (final, said)
    assert len(list((tmp_path / "ok").iterdir())) == 1
