"""Shared fixtures: a PAS daemon, DCMTK peers and Orthanc, each cleaned up after the test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import peers, zygote
from tests.support.http_peers import DicomWebRecorder
from tests.support.peers import CT_DIR, MR_DIR, Orthanc, PasProcess, StoreSCP

# The suite's pas commands are forked from a warm interpreter (tests/support/zygote.py). Not
# the benchmarks': they measure pas as it runs on the appliance, a new interpreter.
zygote.ENABLED = True
# Nor the benchmarks' Orthanc: the suite's does not fsync each file (peers.ORTHANC_SYNCS_FILES).
peers.ORTHANC_SYNCS_FILES = False


# What PAS itself reads from its environment (appliance/config.py, appliance/hub/config.py):
# a developer's `export PAS_DICOM__PORT=11113` or PAS_HOME, left from `make demo`, went into
# every daemon and command the tests start (they pass os.environ on) and changed what they
# tested. The suite's own knobs (PAS_FAULT_SEED, PAS_FUZZ_SECONDS, PAS_TEST_EXEC...) stay.
PRODUCT_ENVIRONMENT = ("PAS_HOME", "PAS_CONFIG", "PAS_ENROLL_TOKEN", "PAS_HUB_HOME")


def _reads_as_product_setting(name: str) -> bool:
    return (name in PRODUCT_ENVIRONMENT or name.startswith("PAS_HUB_")
            or (name.startswith("PAS_") and "__" in name))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root (network namespaces)")
    for name in [name for name in os.environ if _reads_as_product_setting(name)]:
        del os.environ[name]
    for folder in (CT_DIR, MR_DIR):
        if not folder.is_dir():
            raise pytest.UsageError(f"{folder} is missing: ../shared must be beside the repo")


def _file_seconds() -> dict[str, float]:
    weights: dict[str, float] = {}
    for line in (Path(__file__).parent / "file_seconds.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            seconds, path = line.split()
            weights[path] = float(seconds)
    return weights


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The heaviest test files first (tests/file_seconds.txt), each file's tests together
    and in their order. With ``--dist loadfile`` a worker takes the next file when it is
    free: in name order the uplink and WAN files (~330 s of the ~2,070 s) came last and
    one worker ran them alone at the end; longest first, the three workers end together."""
    weights = _file_seconds()
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    ordered = sorted(files, key=lambda path: -weights.get(path, 0.0))  # stable: name order
    items[:] = [item for path in ordered for item in files[path]]


@pytest.fixture
def pas_factory(tmp_path: Path) -> Iterator[Callable[..., PasProcess]]:
    started: list[PasProcess] = []

    def make(env: dict[str, str] | None = None, home: Path | None = None,
             start: bool = True, **kwargs) -> PasProcess:  # type: ignore[no-untyped-def]
        pas = PasProcess(home or tmp_path / f"pas{len(started)}", env, **kwargs)
        started.append(pas)
        return pas.start() if start else pas

    yield make
    for pas in started:
        pas.stop()


@pytest.fixture
def pas(pas_factory: Callable[..., PasProcess]) -> PasProcess:
    """A PAS daemon that accepts any calling AE."""
    return pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true"})


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "storescp").start()
    yield scp
    scp.stop()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    if os.geteuid() != 0:
        pytest.fail("Orthanc runs in a network namespace: the tests must run as root")
    started: list[Orthanc] = []

    def make(**kwargs) -> Orthanc:  # type: ignore[no-untyped-def]
        orthanc = Orthanc(tmp_path / f"orthanc{len(started)}", **kwargs)
        started.append(orthanc)
        return orthanc.start()

    yield make
    for orthanc in started:
        orthanc.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Debian's headless Chromium through Debian's chromedriver (tests/support/browser.py),
    one per test module."""
    from tests.support.browser import chromium

    driver = chromium(tmp_path_factory.mktemp("chromium"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A ``pas hub run`` on its own fresh home, one per test module (a module with a hub of
    another configuration defines its own ``hub``)."""
    from tests.support.hub import HubProcess

    process = HubProcess(tmp_path_factory.mktemp("hub") / "home").init()
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def pynetdicom_senders_fixed() -> None:
    """A module's pynetdicom senders get the fix PAS installs in its own processes:
    pynetdicom 3.0.4's association loop can take a fast SCP's C-STORE-RSP meant for
    ``send_c_store``, which then waits out its timeout (about 1 in 2,000-5,000 under load,
    seen against DCMTK storescp too: a flaky sender, not PAS). Used through ``pytestmark``."""
    from appliance import dicomnet

    dicomnet.install()


@pytest.fixture
def recorder() -> Iterator[DicomWebRecorder]:
    """A DICOMweb stand-in on loopback recording each request (tests/support/http_peers.py)."""
    peer = DicomWebRecorder()
    yield peer
    peer.close()
