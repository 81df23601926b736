"""Reading the regional archive: QIDO-RS and WADO-RS through the hub's read-only proxy.

Owns: the HTTP client for ``GET {hub}/api/v1/region/dicom-web/{path}`` (docs/protocol.md,
"Reading the region"), with the enrolment's mutual-TLS context, or a plain DICOMweb root for
regions that offer one directly (``prefetch.dicomweb_url``). Shared by the prefetch and the
fetch-through of the serving side, so that both speak to the region the same way. May not
touch: the database or the spool; callers store what it returns.

Memory stays bounded (invariant 8): instances are retrieved one WADO-RS request each, so the
largest thing held is one instance, never a study; a study's list is read a page at a time.
"""

from __future__ import annotations

import json
import ssl
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from appliance.transfer.client import wan_timeout
from appliance.transfer.enrolment import load_enrolment
from appliance.transfer.http import BearerAuth, http_client
from appliance.words import error_words

if TYPE_CHECKING:
    from appliance.config import PrefetchSection

REGION_PREFIX = "/api/v1/region/dicom-web"
DICOM_JSON = "application/dicom+json"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# Instances asked per QIDO-RS request when a study is listed: about 0.8 kB of JSON each,
# 7.5 kB once parsed (2,000 a page took fetch-through +30 MB, 500 +18 MB, 1,000 +22 MB).
REGION_PAGE = 1000
# Most bytes of one QIDO-RS answer read (invariant 8). Parsed, an answer takes about 10x its
# size (a study-level answer of 14 MB took 142 MB): 8 MiB is some 20,000 studies with every
# field, a page of REGION_PAGE instances about 1 MB. Past it the read stops with RegionError.
MAX_ANSWER_BYTES = 8 << 20
# Most bytes of one instance's WADO-RS answer: it is held whole (its callers file it from
# memory), once, while it streams in. A larger instance is refused with RegionError.
MAX_INSTANCE_BYTES = 512 << 20


class RegionError(Exception):
    """The region could not answer; the message says which request and why. An HTTP
    refusal keeps its ``status`` and ``body`` (the JSON problem when there is one), so that
    a caller can tell a refused certificate (``transfer.link_failures.trust_problem``) from a
    refused request."""

    def __init__(self, message: str, status: int | None = None, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body

    @classmethod
    def refused(cls, what: str, answer: httpx.Response | Answer) -> RegionError:
        """The error for an answer with an error status (its content read)."""
        try:
            body: Any = answer.json()
        except ValueError:
            body = None
        return cls(f"{what}: HTTP {answer.status_code} {answer.text[:200]}",
                   answer.status_code, body)


@dataclass(frozen=True)
class Answer:
    """An answer of the region, read whole up to a limit (:meth:`RegionClient._get`)."""

    status_code: int
    headers: httpx.Headers
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


@dataclass(frozen=True)
class RegionInstance:
    study_uid: str
    series_uid: str
    sop_instance_uid: str


def region_auth(prefetch: PrefetchSection) -> httpx.Auth | None:
    """The credentials ``prefetch.dicomweb_url`` is read with: a bearer token, else HTTP
    Basic, else none (set as the client's ``auth``, never in the URL: a URL is shown)."""
    if prefetch.dicomweb_bearer_token is not None:
        return BearerAuth(prefetch.dicomweb_bearer_token)
    if prefetch.dicomweb_username is not None:
        return httpx.BasicAuth(prefetch.dicomweb_username, prefetch.dicomweb_password or "")
    return None


def region_ca_problem(prefetch: PrefetchSection) -> str | None:
    """Why ``prefetch.dicomweb_ca_file`` cannot be used, or None: read as the region
    client reads it. Checked by ``pas run`` before it starts (refused, naming the key: the
    region clients are built at the start) and by ``pas config check`` (a warning: it may
    run where the file is not, or as another user), not by the configuration's own
    validation, which every command runs (a file missing there stopped ``pas status``;
    review s43)."""
    ca_file = prefetch.dicomweb_ca_file
    if ca_file is None or not str(prefetch.dicomweb_url or "").startswith("https://"):
        return None
    try:
        ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        return (f"prefetch.dicomweb_ca_file: {ca_file}: not a readable PEM bundle of CA "
                f"certificates ({exc})")
    return None


class RegionClient:
    """A keep-alive HTTP client on the region's DICOMweb root. Thread-safe (httpx.Client)."""

    def __init__(self, base_url: str, verify: ssl.SSLContext | bool = True,
                 timeout_s: float = 60.0, max_connections: int = 8,
                 on_downloaded: Callable[[int], None] | None = None,
                 auth: httpx.Auth | None = None, proxy: httpx.Proxy | None = None):
        self.base_url = base_url.rstrip("/")
        # Told the bytes each answer took on the wire (compressed as sent): WAN metrics.
        self.on_downloaded = on_downloaded
        # The connect is bounded apart (CONNECT_TIMEOUT_S): a hub that drops every packet
        # fails a viewer's fetch-through in seconds, not after the whole timeout.
        self.client = http_client(
            proxy=proxy, verify=verify, timeout=wan_timeout(timeout_s), auth=auth,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections))

    @classmethod
    def from_home(cls, home: Path, dicomweb_url: str | None = None, timeout_s: float = 60.0,
                  max_connections: int = 8,
                  on_downloaded: Callable[[int], None] | None = None,
                  prefetch: PrefetchSection | None = None,
                  proxy: httpx.Proxy | None = None) -> RegionClient | None:
        """The hub proxy when enrolled, a direct DICOMweb root when configured, else None.
        ``prefetch``: the section whose ``dicomweb_*`` credentials go to ``dicomweb_url``;
        ``proxy``: the hospital's proxy (``hub.proxy``): towards the hub, and towards
        ``dicomweb_url`` when the section says ``dicomweb_through_proxy``."""
        if dicomweb_url:
            through = prefetch is not None and prefetch.dicomweb_through_proxy
            ca_file = prefetch.dicomweb_ca_file if prefetch is not None else None
            verify: ssl.SSLContext | bool = True
            if ca_file is not None and dicomweb_url.startswith("https://"):
                try:  # pas run checked it before it started (region_ca_problem)
                    verify = ssl.create_default_context(cafile=str(ca_file))
                except (OSError, ssl.SSLError) as exc:
                    raise RegionError(f"prefetch.dicomweb_ca_file {ca_file}: not a readable "
                                      f"PEM bundle of CA certificates ({exc})") from None
            return cls(dicomweb_url, verify, timeout_s, max_connections, on_downloaded,
                       auth=region_auth(prefetch) if prefetch is not None else None,
                       proxy=proxy if through else None)
        enrolment = load_enrolment(home)
        if enrolment is None:
            return None
        return cls(enrolment.url.rstrip("/") + REGION_PREFIX, enrolment.ssl_context(),
                   timeout_s, max_connections, on_downloaded, proxy=proxy)

    def close(self) -> None:
        self.client.close()

    def _get(self, path: str, params: dict[str, Any] | None, accept: str,
             limit: int = MAX_ANSWER_BYTES) -> Answer:
        """One GET, its answer streamed in and read whole up to ``limit`` bytes (as decoded:
        a compressed answer counts what it inflates to); past it :class:`RegionError`, the
        rest unread. An error status raises :class:`RegionError` too."""
        url = f"{self.base_url}/{path.lstrip('/')}"
        if params:
            # QIDO wildcards (* ?) must travel as they are: httpx would write %2A, which some
            # archives (Orthanc) then match literally.
            url += "?" + urllib.parse.urlencode(params, doseq=True, safe="*?,")
        content = bytearray()
        try:
            with self.client.stream("GET", url, headers={"Accept": accept}) as response:
                for chunk in response.iter_bytes(256 * 1024):
                    content += chunk
                    if len(content) > limit:
                        if self.on_downloaded is not None:
                            self.on_downloaded(response.num_bytes_downloaded)
                        raise RegionError(f"GET {path.partition('?')[0]}: the region's answer "
                                          f"is over {limit} bytes: not read further")
                if self.on_downloaded is not None:
                    self.on_downloaded(response.num_bytes_downloaded)
                answer = Answer(response.status_code, response.headers, bytes(content))
        except httpx.HTTPError as exc:
            raise RegionError(f"GET {path}: {error_words(exc)}") from exc
        del content
        if answer.status_code >= 400:
            raise RegionError.refused(f"GET {path}", answer)
        return answer

    def qido(self, path: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """A QIDO-RS search; the DICOM JSON answer (an empty list for 204)."""
        return self._json_array(path, self._get(path, params, DICOM_JSON))

    @staticmethod
    def _json_array(path: str, response: Answer) -> list[dict[str, Any]]:
        if response.status_code == 204 or not response.content:
            return []
        result = response.json()
        if not isinstance(result, list):
            raise RegionError(f"GET {path}: expected a JSON array, got {type(result).__name__}")
        return result

    def search_studies(self, patient_id: str, issuer: str = "") -> list[dict[str, Any]]:
        params: dict[str, Any] = {
            "PatientID": patient_id,
            "includefield": ["StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
                             "NumberOfStudyRelatedInstances", "StudyDescription"],
        }
        if issuer:
            params["IssuerOfPatientID"] = issuer
        return self.qido("studies", params)

    def series_of(self, study_uid: str) -> list[dict[str, Any]]:
        return self.qido(f"studies/{study_uid}/series",
                         {"includefield": ["BodyPartExamined", "Modality"]})

    def instances_of(self, study_uid: str) -> list[RegionInstance]:
        """Every instance the region lists for a study (a prior's WADO-RS fallback), read
        :meth:`instance_pages` at a time."""
        return [i for page in self.instance_pages(study_uid) for i in page]

    def instance_pages(self, study_uid: str,
                       page_size: int = REGION_PAGE) -> Iterator[list[RegionInstance]]:
        """The instances the region lists for a study, ``page_size`` at a time (QIDO-RS
        limit and offset, PS3.18 8.3.4.4). The whole answer in one request was 157 MB of
        JSON for a study of 200,000 instances, held with every object parsed from it. A page
        shorter than asked ends the list, unless the region said it cut the answer (a
        Warning: it caps its results); a region that ignores limit answers everything at
        once, which is then the whole list."""
        offset = 0
        while True:
            response = self._get(f"studies/{study_uid}/instances",
                                 {"limit": page_size, "offset": offset}, DICOM_JSON)
            rows = self._json_array(f"studies/{study_uid}/instances", response)
            # Any 299 warning: one more request is cheaper than a list silently cut short.
            warned = "299" in response.headers.get("warning", "")
            page = []
            for row in rows:
                series_uid = value(row, "0020000E")
                sop_uid = value(row, "00080018")
                if series_uid and sop_uid:
                    page.append(RegionInstance(study_uid, series_uid, sop_uid))
            del rows, response
            if page:
                yield page
            got = len(page)
            if not got or got > page_size:
                return
            if got < page_size and not warned:
                return
            offset += got

    def stream_series(self, study_uid: str, series_uid: str) -> Iterator[bytes]:
        """WADO-RS of a whole series, one Part 10 file at a time as the parts arrive: one
        request instead of one per instance (what a long RTT and small instances need)."""
        path = f"studies/{study_uid}/series/{series_uid}"
        url = f"{self.base_url}/{path}"
        try:
            with self.client.stream("GET", url, headers={"Accept": MULTIPART_DICOM}) as answer:
                if answer.status_code >= 400:
                    answer.read()
                    raise RegionError.refused(f"GET {path}", answer)
                parser = _MultipartStream(_boundary(answer.headers.get("content-type", "")))
                for chunk in answer.iter_bytes(256 * 1024):
                    yield from parser.feed(chunk)
                if self.on_downloaded is not None:
                    self.on_downloaded(answer.num_bytes_downloaded)
                if not parser.closed:
                    raise RegionError(f"GET {path}: the multipart answer was cut short")
        except httpx.HTTPError as exc:
            raise RegionError(f"GET {path}: {error_words(exc)}") from exc

    def retrieve_instance(self, instance: RegionInstance,
                          limit: int = MAX_INSTANCE_BYTES) -> bytes:
        """WADO-RS of one instance, as stored by the region (transfer-syntax=*): the Part 10
        file, byte for byte. Parsed as it streams in (one copy of the instance held, not the
        answer and its part); an answer over ``limit`` bytes stops with :class:`RegionError`."""
        path = (f"studies/{instance.study_uid}/series/{instance.series_uid}/instances/"
                f"{instance.sop_instance_uid}")
        url = f"{self.base_url}/{path}"
        parts: list[bytes] = []
        read = 0
        try:
            with self.client.stream("GET", url, headers={"Accept": MULTIPART_DICOM}) as answer:
                if answer.status_code >= 400:
                    head = answer.iter_bytes(64 * 1024)
                    error = Answer(answer.status_code, answer.headers, next(head, b""))
                    raise RegionError.refused(f"GET {path}", error)
                parser = _MultipartStream(_boundary(answer.headers.get("content-type", "")))
                for chunk in answer.iter_bytes(256 * 1024):
                    read += len(chunk)
                    if read > limit:
                        raise RegionError(f"WADO-RS {instance.sop_instance_uid}: the region's "
                                          f"answer is over {limit} bytes: not read further")
                    parts += parser.feed(chunk)
                    if len(parts) > 1:
                        break
                if self.on_downloaded is not None:
                    self.on_downloaded(answer.num_bytes_downloaded)
        except httpx.HTTPError as exc:
            raise RegionError(f"GET {path}: {error_words(exc)}") from exc
        if len(parts) != 1:  # a part counts once its delimiter arrived: none if cut short
            raise RegionError(f"WADO-RS {instance.sop_instance_uid}: expected one part, got "
                              f"{len(parts)}{'' if len(parts) > 1 else ' whole'}")
        return parts[0]


class _MultipartStream:
    """Incremental ``multipart/related`` parser: feed chunks, get whole parts as they end.

    Holds at most one part plus one chunk, so a series of any size streams through."""

    def __init__(self, boundary: bytes):
        self.opening = b"--" + boundary
        self.delimiter = b"\r\n--" + boundary
        self.buffer = bytearray()
        self.started = False
        self.closed = False
        self.scan_from = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buffer += chunk
        parts: list[bytes] = []
        while not self.closed:
            if not self.started:
                at = self.buffer.find(self.opening)
                if at < 0:
                    return parts
                del self.buffer[: at + len(self.opening)]
                self.started = True
            # After a delimiter: "--" closes, else CRLF, headers, CRLF CRLF, content.
            if len(self.buffer) < 2:
                return parts
            if self.buffer[:2] == b"--":
                self.closed = True
                break
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return parts
            end = self.buffer.find(self.delimiter, max(head_end + 4, self.scan_from))
            if end < 0:
                self.scan_from = max(head_end + 4, len(self.buffer) - len(self.delimiter))
                return parts
            with memoryview(self.buffer) as view:  # one copy (a slice of a bytearray is one)
                parts.append(bytes(view[head_end + 4: end]))
            del self.buffer[: end + len(self.delimiter)]
            self.scan_from = 0
        return parts


def value(row: dict[str, Any], tag: str) -> Any:
    """The first value of a DICOM JSON attribute, or None."""
    values = row.get(tag, {}).get("Value")
    return values[0] if values else None


def _boundary(content_type: str) -> bytes:
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, val = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = val.strip().strip('"')
    if not content_type.lower().startswith("multipart/") or not boundary:
        raise RegionError(f"expected multipart/related with a boundary, got {content_type!r}")
    return boundary.encode()


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a ``multipart/related`` answer (RFC 2046), headers dropped."""
    delimiter = b"--" + _boundary(content_type)
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # the close delimiter
        chunk = chunk.removeprefix(b"\r\n")
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise RegionError("a multipart part has no header/body separator")
        parts.append(content.removesuffix(b"\r\n"))
    return parts
