"""A C-MOVE to a configured destination that takes none of the study: every instance a failed
sub-operation, not "move destination unknown".

Found in review (2026-12-05): a C-MOVE to a known destination whose sub-association did not
come up ended in 0xA801 "Refused: Move destination unknown" (pynetdicom's answer when its
association attempt fails), whatever the reason: a CT-only workstation asked for an MR study
(it accepted the association, none of its presentation contexts), a workstation rejecting
the association, one switched off. The viewer was told the destination is unknown, which it
is not, and got no counts and no Failed SOP Instance UID List. PS3.4 C.4.2.3.1: "A
sub-operation is considered Failed if the SCP is unable to negotiate an appropriate
presentation context for a given stored SOP Instance"; all failed: Failure or Refused, the
counts and the list (C.4.2.1.4); 0xA801 is for a Move Destination the SCP does not know
(C.4.2.1.5). DCMTK's own Q/R SCP (dcmqrdb) answers an AE title it cannot map 0xA801 and a
sub-association it could not build by failing every sub-operation, 0xA702 "Refused: Out of
resources - Unable to perform sub-operations". PAS now does the same, as it reports a partly
lost study (tests/test_serving_partly_lost.py): the final response counts every instance
failed and names them, and its Error Comment says why (the SOP classes refused, the
rejection, the destination unreachable). A destination that accepts some of the classes
(the others sent, the refused ones failed: 0xB000) was already right and is checked here.

Real peers: ``pas run``, DCMTK storescu as the modality, storescp as the destinations (one
accepting CT Image Storage only, one rejecting every association, a closed port), pynetdicom
as the viewer reading the final responses (``appliance.dicomnet.install()`` first), movescu
as a viewer too.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.support.cleanup import started
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    Orthanc,
    PasProcess,
    RetrieveAudit,
    StoreSCP,
    closed_port,
    storescu,
)
from tests.support.storescp_profiles import one_class_profile

CT_ONLY_PROFILE = one_class_profile("CTOnly", "CTImageStorage")
MR_COUNT = 4


class Site(RetrieveAudit):
    """PAS holding a CT study (3 instances) and 4 MR instances of one study, and three
    configured destinations: CTONLY (accepts CT Image Storage only), REFUSING (rejects every
    association), SWITCHEDOFF (a port that refuses connections) and MISTYPED (a workstation,
    Orthanc checking the called AE title, configured in PAS under another title than its
    own: it rejects the association, "called AE title not recognised")."""

    def __init__(self, root: Path):
        ct = sorted(CT_DIR.glob("A002304_*.dcm"))
        self.ct_study = str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
        ct = [p for p in ct
              if str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) == self.ct_study]
        mr = sorted(MR_DIR.glob("*.dcm"))[:MR_COUNT]
        self.ct = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct]
        self.mr = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in mr]
        self.mr_study = str(dcmread(mr[0], stop_before_pixels=True).StudyInstanceUID)
        profile = root / "ct-only.cfg"
        root.mkdir(parents=True, exist_ok=True)
        profile.write_text(CT_ONLY_PROFILE)
        with contextlib.ExitStack() as stack:  # a step that raises stops those started
            self.ct_only = started(stack, StoreSCP(root / "ct-only", ae_title="CTONLY"),
                                   ["-xf", str(profile), "CTOnly"])
            self.refusing = started(stack, StoreSCP(root / "refusing", ae_title="REFUSING"),
                                    ["--refuse"])
            self.switched_off = closed_port()  # refuses connections while the module runs
            stack.callback(self.switched_off.close)
            self.workstation = started(stack, Orthanc(
                root / "workstation", ae_title="VIEWSTATION",
                extra_config={"DicomCheckCalledAet": True}))
            destinations = ", ".join(
                f'{{title = "{title}", host = "{host}", port = {port}}}'
                for title, host, port in (
                    ("CTONLY", "127.0.0.1", self.ct_only.port),
                    ("REFUSING", "127.0.0.1", self.refusing.port),
                    ("SWITCHEDOFF", "127.0.0.1", self.switched_off.getsockname()[1]),
                    ("MISTYPED", self.workstation.host, self.workstation.dicom_port)))
            self.pas = started(stack, PasProcess(root / "pas", {
                "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                "PAS_SERVING__MOVE_DESTINATIONS": f"[{destinations}]",
            }))
            storescu([*ct, *mr], self.pas.port)
            self._stack = stack.pop_all()  # set up: stop() stops them from now on

    def stop(self) -> None:
        self._stack.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = Site(tmp_path_factory.mktemp("move-not-up"))
    try:
        yield site
    finally:
        site.stop()


def _move(site: Site, destination: str, identifier: Dataset) -> tuple[Dataset, list[str]]:
    """A C-MOVE by pynetdicom: its final response and Failed SOP Instance UID List."""
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelMove,
    )

    from appliance import dicomnet

    dicomnet.install()  # pynetdicom's own SCU loop can lose an answer (dicomnet/__init__)
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", site.pas.port, ae_title="PAS")
    assert assoc.is_established
    try:
        final, answer = list(assoc.send_c_move(
            identifier, destination, StudyRootQueryRetrieveInformationModelMove))[-1]
    finally:
        assoc.release()
    value = (answer.get("FailedSOPInstanceUIDList", []) if answer is not None else [])
    return final, [str(v) for v in ([value] if isinstance(value, str) else value)]


def _study(uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = uid
    return identifier


def _counts(final: Dataset) -> tuple[int, int | None, int | None, int | None]:
    def count(name: str) -> int | None:
        value = final.get(f"NumberOf{name}Suboperations")
        return None if value is None else int(value)
    return (int(final.Status), count("Completed"), count("Failed"), count("Warning"))


def test_a_destination_accepting_none_of_the_classes_fails_every_instance(site: Site) -> None:
    """The CT-only workstation asked for the MR study: 0xA702, 4 failed, the 4 named, the
    refused class in the Error Comment (was 0xA801, no counts, no list)."""
    before = len(site.retrieves())
    final, failed = _move(site, "CTONLY", _study(site.mr_study))
    assert _counts(final) == (0xA702, 0, MR_COUNT, 0), final
    assert sorted(failed) == sorted(site.mr)
    assert final.ErrorComment == "CTONLY accepted none of: MR Image Storage"
    assert site.ct_only.files() == []
    row = site.next_retrieve(before)
    assert row["outcome"] == (f"failure: {MR_COUNT} of {MR_COUNT} instances not stored by "
                              "CTONLY (no presentation context accepted for MR Image Storage)")
    assert row["detail"] == f"C-MOVE to CTONLY: 0 completed, {MR_COUNT} failed, 0 warning"
    assert row["actor"] == "VIEWER" and site.mr_study in row["target"]
    # The journal says it once, as any retrieve that did not deliver everything.
    assert re.search(r" WARNING .*retrieve by VIEWER: failure: 4 of 4 instances not stored "
                     r"by CTONLY \(no presentation context accepted for MR Image Storage\); "
                     r"C-MOVE to CTONLY: 0 completed, 4 failed, 0 warning", site.pas.log())


def test_movescu_reads_the_refusal_with_its_counts(site: Site) -> None:
    """DCMTK as the viewer: 0xA702 with the counts, the Failed SOP Instance UID List and the
    comment (was 0xA801 "Refused: MoveDestinationUnknown")."""
    result = subprocess.run(
        ["movescu", "-d", "-S", "-aet", "VIEWER", "-aec", "PAS", "-aem", "CTONLY",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={site.mr_study}",
         "127.0.0.1", str(site.pas.port)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
    said = result.stdout + result.stderr
    final = said.split("Received Final Move Response")[1]
    assert re.search(r"DIMSE Status\s*: 0xa702: Refused: Out of resources - Unable to "
                     r"perform sub-operations", final), said[-3000:]
    assert re.search(r"Completed Suboperations\s*: 0\n", final), final
    assert re.search(r"Failed Suboperations\s*: 4\n", final), final
    listed = re.search(r"\(0008,0058\) UI \[([^\]]*)\]", final)
    assert listed and sorted(listed.group(1).split("\\")) == sorted(site.mr), final
    assert "(0000,0902) LO [CTONLY accepted none of: MR Image Storage]" in final, final
    assert site.ct_only.files() == []


def test_a_destination_accepting_some_classes_gets_those(site: Site) -> None:
    """CT and MR asked of the CT-only workstation: the 3 CT stored, the 4 MR failed and
    named, 0xB000 (as before: checked, not changed)."""
    before = len(site.retrieves())
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.SOPInstanceUID = site.ct + site.mr
    final, failed = _move(site, "CTONLY", identifier)
    assert _counts(final) == (0xB000, 3, MR_COUNT, 0), final
    assert sorted(failed) == sorted(site.mr)
    stored = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
              for p in site.ct_only.files()}
    assert stored == set(site.ct)
    row = site.next_retrieve(before)
    assert row["outcome"] == (f"failure: {MR_COUNT} of 7 instances not stored by CTONLY (no "
                              "presentation context accepted for MR Image Storage)")
    assert row["detail"] == f"C-MOVE to CTONLY: 3 completed, {MR_COUNT} failed, 0 warning"


# The Error Comment and the audit row's reason for each way the destination did not come up.
# Which way it did not come up is said (it was "destination unreachable or association lost"
# for all three): nothing took the connection; it was closed before an answer PAS read.
NO_CONNECTION = ("{title}: could not connect (refused or no answer)",
                 "could not connect (refused or no answer)")
CLOSED = ("{title}: closed while negotiating the association",
          "closed while negotiating the association")


def _rejected(reason: str) -> tuple[str, str]:
    return ("{title} rejected: " + reason,
            "the destination rejected the association: " + reason)


@pytest.mark.parametrize(("destination", "said"), [
    # storescp --refuse answers A-ASSOCIATE-RJ and closes at once: PAS's DICOM layer may see
    # the close before the rejection (tests/test_serving_retrieve_audit.py), hence either.
    ("REFUSING", (_rejected("no reason given"), CLOSED)),
    ("SWITCHEDOFF", (NO_CONNECTION,)),
    # The rejection's reason is said: the fix is in PAS's destination entry (its title).
    ("MISTYPED", (_rejected("called AE title not recognised"), CLOSED)),
])
def test_a_known_destination_that_does_not_come_up_fails_every_instance(
        site: Site, destination: str, said: tuple[tuple[str, str], ...]) -> None:
    """Rejected or unreachable: the destination is known, the sub-operations could not be
    performed: 0xA702, every instance failed and named, why in the Error Comment (was
    0xA801 "move destination unknown"): a rejection with its reason (was without). Up to
    three moves, for a rejection whose close PAS saw first; a rejection is named at least
    once. An unknown title stays 0xA801."""
    address = {"REFUSING": f"127.0.0.1:{site.refusing.port}",
               "SWITCHEDOFF": f"127.0.0.1:{site.switched_off.getsockname()[1]}",
               "MISTYPED": f"{site.workstation.host}:{site.workstation.dicom_port}"}[destination]
    for _attempt in range(3):
        before = len(site.retrieves())
        final, failed = _move(site, destination, _study(site.ct_study))
        assert _counts(final) == (0xA702, 0, 3, 0), final
        assert sorted(failed) == sorted(site.ct)
        row = site.next_retrieve(before)
        seen = (final.ErrorComment, row["outcome"])
        expected = {(comment.format(title=destination),
                     f"failure: 3 of 3 instances not stored by {destination} (no association "
                     f"with {address}: {why})") for comment, why in said}
        assert seen in expected, seen
        assert row["detail"] == f"C-MOVE to {destination}: 0 completed, 3 failed, 0 warning"
        if final.ErrorComment == said[0][0].format(title=destination):
            break
    assert final.ErrorComment == said[0][0].format(title=destination), final.ErrorComment
    # An unknown destination: 0xA801, no sub-operation, no counts.
    final, failed = _move(site, "NOWHERE", _study(site.ct_study))
    assert _counts(final) == (0xA801, None, None, None), final
    assert final.ErrorComment == "unknown move destination 'NOWHERE'"
    assert failed == []
