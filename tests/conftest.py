"""Shared fixtures: a PAS daemon, DCMTK peers and Orthanc, each cleaned up after the test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.peers import CT_DIR, MR_DIR, Orthanc, PasProcess, StoreSCP


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root (network namespaces)")
    for folder in (CT_DIR, MR_DIR):
        if not folder.is_dir():
            raise pytest.UsageError(f"{folder} is missing: ../shared must be beside the repo")


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
