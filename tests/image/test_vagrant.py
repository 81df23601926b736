"""The Vagrantfile: valid for Debian's vagrant with the libvirt provider, local box only."""

from __future__ import annotations

import os
import re
import subprocess

from tests.support.peers import ROOT


def test_vagrantfile_validates_and_uses_only_the_local_box(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
           "VAGRANT_DEFAULT_PROVIDER": "libvirt", "VAGRANT_CHECKPOINT_DISABLE": "1"}
    result = subprocess.run(["vagrant", "validate"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Vagrantfile validated successfully" in result.stdout
    text = (ROOT / "Vagrantfile").read_text()
    assert set(re.findall(r'vm\.define "([^"]+)"', text)) == {"hub", "regional-pacs", "site-a"}
    boxes = re.findall(r'box(?:_url)?\s*=\s*"([^"]+)"', text)
    assert boxes == ["pas-local", "file://#{BOX_FILE}"], boxes  # never a catalogue box
