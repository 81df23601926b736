"""Reading the region: ``GET /api/v1/region/dicom-web/{path}``, QIDO-RS and WADO-RS, read-only.

Owns: forwarding GETs (query string and ``Accept`` kept) to the archive's DICOMweb root and
streaming the answer back. May not touch: anything that writes. With the ``embedded``
archive, the serving engineer's DICOMweb routes (``appliance.serving.dicomweb``) are mounted
over the archive's (Database, Spool), read-only (no STOW receiver: POST is 405).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from appliance.hub.app import problem
from appliance.hub.archive import archive_client_options, trust_problem
from appliance.transfer.http import async_http_client

if TYPE_CHECKING:
    from appliance.hub.app import Hub

PREFIX = "/api/v1/region/dicom-web"
# What a path segment of QIDO-RS / WADO-RS is made of: resource names ("studies",
# "metadata", "rendered"), UIDs, frame lists ("1,2"), bulk data tags. Anything else is
# refused: the path reaches the archive with the hub's credentials, and a segment the server
# decodes once more ("%2e%2e", sent as "%252e%252e") or reads as a parent (Tomcat's "..;")
# took a site out of the DICOMweb root into the archive's whole REST API (review s41).
SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.,_-]*")
PASSED_HEADERS = ("content-type", "content-length", "content-encoding", "etag", "last-modified")


def region_routes(hub: Hub) -> list[BaseRoute]:
    archive = hub.settings.archive
    embedded = getattr(hub.archive, "spool", None)
    if archive.kind == "embedded" and embedded is not None:
        from appliance.serving.dicomweb import build_dicomweb_routes

        return build_dicomweb_routes(hub.archive.db, embedded,  # type: ignore[attr-defined]
                                     receiver=None, prefix=PREFIX)
    client = (async_http_client(**archive_client_options(archive))
              if archive.kind == "dicomweb" else None)

    async def proxy(request: Request) -> Response:
        """QIDO-RS / WADO-RS of the regional archive, read-only."""
        if client is None or not archive.url:
            return problem(501, "not_implemented",
                           "the embedded archive does not serve DICOMweb yet")
        path = request.path_params["path"]
        bad = next((segment for segment in path.split("/")
                    if not SEGMENT.fullmatch(segment) or segment.strip(".") == ""), None)
        if bad is not None:
            return problem(400, "bad_path", f"path segment {bad[:64]!r} is not a DICOMweb "
                           "resource, UID, frame list or tag (letters, digits, '.', ',', '_' "
                           "and '-', not starting with '.')")
        url = f"{archive.url}/{path}"
        if request.url.query:
            # The query string as received: re-encoding it would turn QIDO's * into %2A,
            # which the archive (Orthanc) then matches literally.
            url += "?" + request.url.query
        headers = {k: v for k, v in request.headers.items() if k.lower() == "accept"}
        upstream = client.build_request("GET", url, headers=headers)
        try:
            answer = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            return problem(502, "archive_unreachable",
                           f"the regional archive: {trust_problem(exc, archive) or exc}")
        passed = {k: v for k, v in answer.headers.items() if k.lower() in PASSED_HEADERS}
        return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code,
                                 headers=passed, background=BackgroundTask(answer.aclose))

    return [Route(PREFIX + "/{path:path}", proxy, methods=["GET"])]
