"""No proxy from the environment (review s40 F2): ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY``
in the daemon's environment are not obeyed; PAS connects where its configuration says.

Before, every httpx client used httpx's default ``trust_env=True``: with ``HTTP_PROXY`` set (a
hospital's ``/etc/environment``, a systemd drop-in), a ``http://127.0.0.1`` STOW-RS
destination, which the configuration check takes for "this machine", went as an absolute-URI
request to the proxy on the network, in clear, with the bearer token and the DICOM bodies;
the hub's archive calls did the same. Here the proxy is a listener on loopback that records
each connection and closes it; the destination a real small DICOMweb server
(tests/support/refusing_archive.py); PAS the real daemon fed by storescu. And every httpx
client in ``appliance/`` is built by ``appliance.transfer.http`` (which passes
``trust_env=False``): a new one cannot forget it.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.http_peers import HangUp
from tests.support.peers import CT_DIR, read_rows, storescu, wait_for
from tests.support.refusing_archive import RefusingArchive

ROOT = Path(__file__).resolve().parent.parent
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                   "all_proxy")
# Built elsewhere than appliance/transfer/http.py without passing trust_env=False itself:
# none. Do not add to this list.
PENDING: set[str] = set()


@pytest.fixture
def proxy() -> Iterator[HangUp]:
    listener = HangUp()
    yield listener
    listener.close()


def _proxied(proxy: HangUp) -> dict[str, str]:
    return {**{name: proxy.url for name in PROXY_VARIABLES}, "NO_PROXY": "", "no_proxy": ""}


def test_a_loopback_stowrs_destination_is_reached_directly_with_proxy_variables_set(
        pas_factory, tmp_path: Path, proxy: HangUp) -> None:
    archive = RefusingArchive()
    try:
        config = tmp_path / "appliance.toml"
        config.write_text(textwrap.dedent(f"""
            [queue]
            max_attempts = 1

            [routing.fallback]
            destinations = ["archive"]

            [destinations.archive]
            kind = "stowrs"
            url = "{archive.url}"
            bearer_token = "TOKEN-SHOULD-NEVER-LEAVE"
            timeout_s = 10
            """))
        files = sorted(CT_DIR.glob("*.dcm"))[:1]
        pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                           **_proxied(proxy)})
        storescu(files, pas.port)
        jobs = wait_for(lambda: [r for r in read_rows(
            pas.home / "pas.sqlite", "SELECT state, last_error FROM jobs")
            if r["state"] in ("done", "failed")], timeout=30, what="the job settled")
        assert [(r["state"], r["last_error"]) for r in jobs] == [("done", None)]
        assert len(archive.stows) == 1 and len(archive.held) == 1
        assert proxy.connections == 0
    finally:
        archive.stop()


def test_the_hub_reaches_its_loopback_archive_directly_with_proxy_variables_set(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, proxy: HangUp) -> None:
    from appliance.hub.archive import DicomWebArchive, RebuiltInstance
    from appliance.hub.config import ArchiveSection

    for name, value in _proxied(proxy).items():
        monkeypatch.setenv(name, value)
    archive = RefusingArchive()
    try:
        path = sorted(CT_DIR.glob("*.dcm"))[0]
        import hashlib

        from pydicom import dcmread

        data = path.read_bytes()
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        hub_side = DicomWebArchive(ArchiveSection(kind="dicomweb", url=archive.url))
        hub_side.store([RebuiltInstance(uid, path, len(data),
                                        hashlib.sha256(data).hexdigest())], "SITE-A")
        assert uid in archive.held
        assert proxy.connections == 0
    finally:
        archive.stop()


def _httpx_calls(tree: ast.AST) -> Iterator[ast.Call]:
    """``httpx.Client(...)``, ``httpx.AsyncClient(...)`` and the module's one-shot calls."""
    made = {"Client", "AsyncClient", "get", "post", "put", "patch", "delete", "head",
            "options", "request", "stream"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "httpx" \
                and node.func.attr in made:
            yield node


def test_every_httpx_client_is_built_by_the_one_constructor() -> None:
    found = []
    for path in sorted((ROOT / "appliance").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if name == "appliance/transfer/http.py":
            continue
        for call in _httpx_calls(ast.parse(path.read_text(), name)):
            trusts = not any(k.arg == "trust_env" and isinstance(k.value, ast.Constant)
                             and k.value.value is False for k in call.keywords)
            if trusts and name not in PENDING:
                found.append(f"{name}:{call.lineno} httpx.{call.func.attr}(...)")  # type: ignore[attr-defined]
    assert found == [], ("use appliance.transfer.http.http_client / async_http_client "
                         "(trust_env=False)")
