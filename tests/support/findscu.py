"""DCMTK findscu as the viewer: one C-FIND, its answers read back with their statuses.

Shared by the regional C-FIND tests (tests/test_serving_region_lists.py,
tests/test_qr_region_levels_s42.py), which each had a copy.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pydicom import Dataset, dcmread

from tests.support.peers import DCMTK_ENV


def find(port: int, model: str, level: str, keys: list[str], out: Path
         ) -> tuple[list[tuple[int, Dataset]], int]:
    """``findscu -X`` (``model``: -P, -S) at ``level`` with ``keys`` to PAS on 127.0.0.1:
    each pending answer with its status, and the final status. Every answer must come with
    its status (one more status: the final)."""
    out.mkdir(parents=True)
    args = ["findscu", "-d", model, "-aet", "VIEWER", "-aec", "PAS", "-X", "-od", str(out),
            "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([*args, "127.0.0.1", str(port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = [int(s, 16) for s in
                re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", result.stderr)]
    answers = [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    assert len(statuses) == len(answers) + 1, result.stderr[-3000:]
    return list(zip(statuses, answers, strict=False)), statuses[-1]
