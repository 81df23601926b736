"""What hospital IT reads on a first installation, against a real ``pas run``: why ``pas
send`` could not associate (an AE title PAS does not know, a wrong called AE, nothing
listening)."""

from __future__ import annotations

from collections.abc import Callable

from tests.support.peers import MR_DIR, PasProcess, free_port

FILES = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:5]


def test_send_says_why_the_association_failed(
        pas_factory: Callable[..., PasProcess]) -> None:
    pas = pas_factory({"PAS_DICOM__KNOWN_AES": '[{ title = "CT2" }]'})
    files = [str(p) for p in FILES]

    unknown = pas.cli("send", *files, check=False)  # pas send calls as PASSEND by default
    assert unknown.returncode == 1
    assert "calling AE title 'PASSEND' not recognised" in unknown.stderr
    assert "dicom.known_aes" in unknown.stderr and "--calling-ae" in unknown.stderr

    wrong_called = pas.cli("send", *files, "--calling-ae", "CT2", "--called-ae", "NOT_PAS",
                           check=False)
    assert wrong_called.returncode == 1
    assert "called AE title 'NOT_PAS' not recognised" in wrong_called.stderr

    closed = pas.cli("send", *files, "--port", str(free_port()), check=False)
    assert closed.returncode == 1 and "no connection" in closed.stderr
    for result in (unknown, wrong_called, closed):
        assert "Traceback" not in result.stderr
    assert pas.status()["instances"] == 0  # nothing arrived from the refused sends

    sent = pas.cli("send", *files, "--calling-ae", "CT2")
    assert f"sent {len(FILES)} of {len(FILES)} files" in sent.stdout
    assert pas.status()["instances"] == len(FILES)
