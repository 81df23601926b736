"""The suite runs on its own settings, not the developer's shell: what PAS reads from its
environment (``PAS_<SECTION>__<KEY>``, ``PAS_HOME``, ``PAS_HUB_...``) is left out of it
(tests/conftest.py), the suite's own knobs kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_product_setting_reaches_the_tests() -> None:
    leaked = sorted(name for name in os.environ
                    if name.startswith("PAS_") and ("__" in name or name in (
                        "PAS_HOME", "PAS_CONFIG", "PAS_ENROLL_TOKEN")
                        or name.startswith("PAS_HUB_")))
    assert leaked == []
    if "PAS_SUITE_KNOB_CHECK" in os.environ:  # set by the test below, in a run of this one
        assert os.environ["PAS_FAULT_SEED"] == "7"


def test_a_shell_with_pas_settings_exported_runs_the_suite_unchanged(tmp_path: Path) -> None:
    """`export PAS_DICOM__PORT=11113` (the README's override example), PAS_HOME from a
    demo: the test above, run in a pytest started from such a shell, still finds none."""
    env = {**os.environ, "PAS_DICOM__PORT": "11113", "PAS_HOME": str(tmp_path / "demo"),
           "PAS_HUB_HOME": str(tmp_path / "hub"), "PAS_HUB_HTTP__PORT": "1",
           "PAS_FAULT_SEED": "7", "PAS_SUITE_KNOB_CHECK": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         f"{__file__}::test_no_product_setting_reaches_the_tests"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
