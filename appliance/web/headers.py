"""What a browser may do with the HTML pages PAS serves (the appliance's status page, the
hub's fleet pages): the response headers every such page carries.

Owns: :func:`page_headers`. May not touch: the routes, the store.

- ``Content-Security-Policy``: no script at all (the pages have none: a value that escaped
  the escaping still runs nothing), the page's own ``<style>`` only (by its hash), forms
  only to the page's own origin, and ``frame-ancestors 'none'``: no other site may show the
  page in a frame (clickjacking: a transparent frame over a decoy, the user's click on the
  Retry button; that POST carries the page's own form token and Origin).
- ``X-Frame-Options: DENY``: the same for browsers without ``frame-ancestors``.
- ``X-Content-Type-Options: nosniff``.
- ``Cache-Control: no-store``: the status page shows patient IDs, and a browser kept a copy
  of every page it showed in its disk cache (a shared ward or IT workstation's profile).
"""

from __future__ import annotations

import base64
import hashlib


def page_headers(style: str) -> dict[str, str]:
    """The headers of a page whose only stylesheet is ``<style>{style}</style>``."""
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    return {
        "Content-Security-Policy": (f"default-src 'none'; style-src 'sha256-{digest}'; "
                                    "form-action 'self'; frame-ancestors 'none'; "
                                    "base-uri 'none'"),
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }
