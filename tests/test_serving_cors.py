"""A web viewer served from another origin reads DICOMweb in the radiologist's browser
(``serving.cors_origins``; appliance/web/app.py, docs/serving.md).

Before, PAS sent no CORS headers: a viewer (OHIF, say) served by the hospital's web server
could not read PAS's DICOMweb from the browser at all, and the only way was a reverse proxy
in front of PAS. Now the origins named may, bearer token and all (the browser's preflight,
which carries no token, is answered before the token is checked); any other origin still may
not, and ``*`` is refused by the configuration (any page on the internet could then read
patient data through a browser on the hospital's network).

Real headless Chromium, pages served by other origins, a real PAS holding one study.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ConfigError, load_settings
from tests.support.browser import OtherSite
from tests.support.objects import tiny_ct
from tests.support.peers import PasProcess, wait_for
from tests.test_serving_qr_versions import send

TOKEN = "cors-test-token-0123456789abcdef"


def _page(pas: PasProcess, token: str) -> str:
    """A viewer's page: it asks PAS for the studies with the token, and writes what came
    back (or that the browser blocked it) in its title."""
    return f"""<!doctype html><title></title><script>
fetch("http://127.0.0.1:{pas.http_port}/dicom-web/studies",
      {{headers: {{"Authorization": "Bearer {token}", "Accept": "application/dicom+json"}}}})
  .then(r => r.text().then(t => {{
      document.title = "status " + r.status + (r.ok ? " " + JSON.parse(t).length : ""); }}))
  .catch(() => {{ document.title = "blocked"; }});
</script>"""


def _title_of(browser: Any, url: str) -> str:
    browser.get(url)
    wait_for(lambda: browser.title != "", 20, what="the page's fetch to end")
    return str(browser.title)


def test_a_viewer_of_a_named_origin_reads_dicomweb_others_are_blocked(
        tmp_path: Path, browser: Any) -> None:
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_PREFETCH__ENABLED": "false",
                                        "PAS_SERVING__AUTH": "bearer",
                                        "PAS_SERVING__BEARER_TOKENS": f'["{TOKEN}"]'})
    with OtherSite(_page(pas, TOKEN)) as viewer, \
            OtherSite(_page(pas, "not-the-token")) as mistyped, \
            OtherSite(_page(pas, TOKEN)) as elsewhere:
        # Written as IT might (upper case scheme): the browser's Origin header is in lower
        # case, and the middleware compares strings; the configuration normalises it.
        origin = viewer.url.rstrip("/").replace("http://", "HTTP://")
        pas.env["PAS_SERVING__CORS_ORIGINS"] = json.dumps(
            [origin, mistyped.url.rstrip("/")])
        pas.start()
        try:
            send(tmp_path / "sent", pas, [tiny_ct(PatientID="P-CORS")])
            assert _title_of(browser, viewer.url) == "status 200 1"
            # A wrong token: the 401 reaches the viewer (it can say so), no data.
            assert _title_of(browser, mistyped.url) == "status 401"
            # An origin not named: the browser does not let its page read the answer.
            assert _title_of(browser, elsewhere.url) == "blocked"
        finally:
            pas.stop()


@pytest.mark.parametrize(("value", "says"), [
    ('["*"]', "'*' would let any web page read patient data"),
    ('["https://viewer.example/ohif"]', "is not an origin: scheme://host[:port], no path"),
    ('["viewer.example"]', "is not an origin"),
    # No browser sends these: refused, not kept to match nothing.
    ('["https://viewer.example:99999"]', "port 99999 is not a TCP port (1-65535)"),
    ('["https://viewer.example:0"]', "port 0 is not a TCP port (1-65535)"),
    ('["http://[fe80::1::2]"]', "fe80::1::2 is not an IPv6 address"),
])
def test_an_origin_that_is_not_one_viewer_is_refused(value: str, says: str) -> None:
    with pytest.raises(ConfigError, match="serving.cors_origins.0: ") as refused:
        load_settings(environ={"PAS_SERVING__CORS_ORIGINS": value})
    assert says in str(refused.value)


@pytest.mark.parametrize(("written", "kept"), [
    ("https://Viewer.Hospital.example:443", "https://viewer.hospital.example"),
    ("HTTP://viewer.hospital.example:80", "http://viewer.hospital.example"),
    ("https://viewer.hospital.example:8443", "https://viewer.hospital.example:8443"),
    ("http://[FE80::1]:8080", "http://[fe80::1]:8080"),
    # A port the browser reads as a number (WHATWG URL): leading zeros gone, then 443 the
    # default; an IPv6 address in its shortest form.
    ("https://viewer.hospital.example:0443", "https://viewer.hospital.example"),
    ("http://viewer.hospital.example:08080", "http://viewer.hospital.example:8080"),
    ("http://[fe80:0:0:0:0:0:0:1]", "http://[fe80::1]"),
])
def test_an_origin_is_kept_as_the_browser_writes_it(written: str, kept: str) -> None:
    """The browser's Origin header has its scheme and host in lower case and no default
    port; the CORS middleware compares strings: an origin written otherwise never matched,
    and nothing said so."""
    settings = load_settings(environ={"PAS_SERVING__CORS_ORIGINS": json.dumps([written])})
    assert settings.serving.cors_origins == [kept]
