"""``pas doctor``'s "open to the network" checks take only this machine's loopback as closed
(review s40 F3): ``localhost.`` and ``127.0.0.1.`` (a trailing dot) are names the resolver
asks DNS for, not the hosts file's localhost nor an address literal, so a listener bound to
one is wherever DNS says. Before, config_types.loopback_host stripped the dot and doctor said
nothing of an HL7 or HTTP port bound so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appliance.config_types import loopback_host
from tests.support.peers import free_port, run_pas


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("LocalHost", True), ("127.0.0.1", True), ("127.9.8.7", True),
    ("::1", True), ("[::1]", True),
    ("localhost.", False), ("LOCALHOST.", False), ("127.0.0.1.", False), ("[::1].", False),
    ("localhost.region.example", False), ("0.0.0.0", False), ("", False),
])
def test_only_localhost_and_loopback_literals_as_written_are_loopback(
        host: str, loopback: bool) -> None:
    assert loopback_host(host) is loopback


def _doctor(home: Path, **env: str) -> dict[str, dict[str, str]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    result = run_pas(["doctor", "--json"], {
        **clean, "PAS_HOME": str(home), "PAS_DICOM__HOST": "127.0.0.1",
        "PAS_DICOM__PORT": str(free_port()), "PAS_HTTP__PORT": str(free_port()),
        "PAS_HL7__PORT": str(free_port()), **env}, timeout=120)
    return {c["name"]: c for c in json.loads(result.stdout)}


@pytest.mark.parametrize("host", ["localhost.", "127.0.0.1.", "LOCALHOST."])
def test_doctor_warns_of_ports_bound_to_a_name_with_a_trailing_dot(tmp_path: Path,
                                                                   host: str) -> None:
    checks = _doctor(tmp_path / "home", PAS_HL7__HOST=host, PAS_HTTP__HOST=host)
    assert checks["HL7 access"]["verdict"] == "warn", checks.get("HL7 access")
    assert checks["HTTP access"]["verdict"] == "warn", checks.get("HTTP access")
    assert checks["HL7 access"]["detail"].startswith(f"{host}:")
