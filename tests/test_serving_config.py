"""`[serving]` configuration: a bad value is refused by `pas config check` naming its key."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.peers import run_pas


def _check(tmp_path: Path, toml: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "appliance.toml"
    path.write_text(toml)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    env["PAS_HOME"] = str(tmp_path / "home")
    return run_pas(["config", "check", str(path)], env, timeout=60)


def test_a_good_serving_section_passes(tmp_path: Path) -> None:
    result = _check(tmp_path, """
[serving]
move_destinations = [{ title = "WS1", host = "127.0.0.1", port = 104 }]
auth = "bearer"
bearer_tokens = ["t0ken"]
query_region = true
""")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("toml", "named"), [
    ('[serving]\nauth = "bearer"\n', "serving.bearer_tokens"),
    ('[serving]\nauth = "client_cert"\ntls_cert = "/x.crt"\n', "serving.tls_key: required"),
    ('[serving]\nauth = "kerberos"\n', "serving.auth"),
    ('[serving]\nmove_destinations = [{ title = "WS1", host = "h", port = 0 }]\n',
     "serving.move_destinations.0.port"),
    ('[serving]\nmove_destinations = [{ title = "A\\\\B", host = "h", port = 104 }]\n',
     "serving.move_destinations.0.title"),
    ('[serving]\nregion_query_timeout_s = 0\n', "serving.region_query_timeout_s"),
    ('[serving]\nqido_max_limit = 0\n', "serving.qido_max_limit"),
    ('[serving]\nmove_destination = []\n', "serving.move_destination"),
])
def test_a_bad_serving_value_is_named(tmp_path: Path, toml: str, named: str) -> None:
    result = _check(tmp_path, toml)
    assert result.returncode != 0
    assert named in result.stdout + result.stderr, result.stdout + result.stderr
