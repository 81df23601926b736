"""pydicom's warnings are in the daemon's log once, not twice.

pydicom says each warning through its "pydicom" logger and again as a Python warning, which
Python writes bare to stderr (the journal): a file path, the pydicom source line, no
instance. A modality engineer found every odd character set twice in the journal. The
logger's line is kept (it goes where the daemon's lines go, cut and escaped); the bare
warning is dropped (appliance/logs.py).
"""

from __future__ import annotations

import subprocess
import sys

from tests.support.peers import ROOT

# What the daemon's logging is set up as, then a value pydicom cannot decode as declared:
# Latin-1 bytes under ISO_IR 192 (UTF-8), as a modality set up wrongly sends them.
SCRIPT = """
from appliance import logs
logs.setup("info")
from pydicom.valuerep import PersonName
print(str(PersonName(b"M\\xfcller^Hans", encodings=["UTF8"])))
"""


def test_a_pydicom_warning_is_logged_once() -> None:
    ran = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.count("Failed to decode byte string") == 1, ran.stderr
    assert "pydicom" in ran.stderr and "UserWarning" not in ran.stderr, ran.stderr
