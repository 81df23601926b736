"""The bucketed download: a study of the region, packed as the upload packs, streamed by the hub.

Owns: the appliance's client: ``POST {hub}/api/v1/downloads`` over the enrolment's mutual
TLS (one connection or lanes), frames read as they arrive, each bucket unpacked
(``appliance.transfer.unpack``) by worker threads, instances rebuilt and checked against the
size and SHA-256 the hub computed from the region's file, then handed to the caller, who files
them (the prefetch, through the ingest Receiver). May not touch: the database or the spool, the
frame format (``appliance.transfer.download_frames`` owns it, shared with the hub).

Why a stream of frames and not a manifest first: the hub learns each instance's size and
SHA-256 only once it has read the file from the archive, so a manifest up front would make the
whole study wait on the hub's disk before the first byte crosses the WAN. Each frame carries
one bucket and the metadata of the instances it holds; the last frame says how many instances
and buckets the stream carried, so a stream cut short is always noticed.

Several studies (``fetch_many``): one request, one stream, the studies one after the other,
each bucket and end frame naming its study; each study is done (and its caller told) as soon
as its own end frame came and its files are filed. ``search``: several patients' studies in one
round trip. ``warm``: a tiny request that keeps one connection to the hub open.

Resuming: the request names the instances the appliance already holds (``have``); the hub
packs only the others. A cut costs at most the buckets in flight (and the earlier buckets of an
instance split across buckets that was not complete yet).

Memory (invariant 8): one frame being read, at most ``workers`` buckets being unpacked, and the
instances they complete; an instance over ``large_above`` bytes in several pieces is rebuilt
in the caller's temp file (``large_file``), not in memory.

The frames, their limits and the check of what they announce are in
``appliance.transfer.download_frames`` (which documents the format).
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from appliance.transfer.client import wan_timeout
from appliance.transfer.download_frames import (
    DOWNLOADS_PATH,
    MAX_SEARCH_BYTES,
    PRIORS_PATH,
    SEARCH_PATH,
    Assembler,
    DownloadError,  # raised by every call here: its callers import it from this module
    FrameReader,
)
from appliance.transfer.enrolment import load_enrolment
from appliance.transfer.http import http_client
from appliance.transfer.lanes import LANES_PATH, LaneFormatError, LaneReader, Reassembly
from appliance.transfer.unpack import BucketFormatError, unpack_bucket
from appliance.words import counted, error_words

KEEP_ALIVE_S = 25.0
WARM_EVERY_S = 20.0


class DownloadUnavailable(Exception):
    """The hub does not offer bucketed downloads (an older hub): use WADO-RS instead."""


class DownloadRefused(DownloadError):
    """The hub answered the request with an error status (``status``) before any frame."""

    status: int



@dataclass
class DownloadResult:
    instances: int = 0
    buckets: int = 0
    wire_bytes: int = 0
    filed: set[str] = field(default_factory=set)


class BatchUnavailable(DownloadUnavailable):
    """The hub downloads one study per request only (it refused ``studies``)."""


@dataclass
class DownloadItem:
    """One study of a batched download (:meth:`HubDownloads.fetch_many`): what to ask for,
    where its instances go, and, once ``done`` is set, its ``result`` or ``error``."""

    study_uid: str
    on_instance: Callable[[str, Any], Any]  # (uid, bytes or a download_frames.RebuiltFile)
    have: set[str] = field(default_factory=set)
    series_uid: str | None = None
    on_bucket: Callable[[list[Any]], None] = lambda done: None
    on_done: Callable[[DownloadItem], None] = lambda item: None
    result: DownloadResult = field(default_factory=DownloadResult)
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)
    ended: dict[str, Any] | None = None  # its end frame
    outstanding: int = 0                 # buckets handed to the workers, not unpacked yet

    def request(self) -> dict[str, Any]:
        body: dict[str, Any] = {"study_uid": self.study_uid, "have": sorted(self.have)}
        if self.series_uid:
            body["series_uid"] = self.series_uid
        return body


@dataclass
class StreamedBody:
    """An NDJSON request body: ``options`` on the first line, then each of ``lines`` as it
    is produced (the request is sent while the caller still gathers its lines)."""

    options: dict[str, Any]
    lines: Iterator[dict[str, Any]]


Body = dict[str, Any] | StreamedBody


def _content(body: Body) -> dict[str, Any]:
    """httpx's arguments for a request body: JSON, or NDJSON sent as produced (chunked)."""
    if not isinstance(body, StreamedBody):
        return {"json": body}

    def produce() -> Iterator[bytes]:
        yield json.dumps(body.options, separators=(",", ":")).encode() + b"\n"
        for line in body.lines:
            yield json.dumps(line, separators=(",", ":")).encode() + b"\n"

    return {"content": produce(), "headers": {"Content-Type": "application/x-ndjson"}}


class HubDownloads:
    """The client side of ``POST /api/v1/downloads``. Thread-safe (one httpx.Client)."""

    def __init__(self, hub_url: str, verify: Any, timeout_s: float = 60.0,
                 on_downloaded: Callable[[int], None] | None = None, workers: int = 4,
                 client: httpx.Client | None = None, lanes: int = 1, rate_bps: int = 0,
                 proxy: httpx.Proxy | None = None):
        self.url = hub_url.rstrip("/") + DOWNLOADS_PATH
        self.search_url = hub_url.rstrip("/") + SEARCH_PATH
        self.lanes_url = hub_url.rstrip("/") + LANES_PATH
        self.priors_url = hub_url.rstrip("/") + PRIORS_PATH
        self.on_downloaded = on_downloaded
        self.workers = workers
        # Striping (appliance.transfer.lanes): with the downlink's rate known, a download
        # goes over ``lanes`` connections that the hub paces at a share of it, once the hub
        # said (in a search answer) that it offers lanes.
        self.lanes = lanes if rate_bps > 0 else 1
        self.rate_bps = int(rate_bps)
        self.hub_has_lanes = False
        self.hub_has_priors = False  # POST /downloads/priors (one round trip for priors)
        self.owns_client = client is None
        # Where an instance of more than ``large_above`` bytes is rebuilt (the caller's temp
        # file: Assembler.large); None: in memory. The prefetch sets both.
        self.large_file: Callable[[], Any] | None = None
        self.large_above = 32 << 20
        # Idle connections kept KEEP_ALIVE_S (the hub keeps them 30 s): ``warm`` every
        # WARM_EVERY_S keeps one open, so an order's first request pays no TCP and TLS
        # handshakes (two round trips on the WAN).
        self.client = client or http_client(
            proxy=proxy, verify=verify, timeout=wan_timeout(timeout_s),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8,
                                keepalive_expiry=KEEP_ALIVE_S))

    @classmethod
    def from_home(cls, home: Path, timeout_s: float = 60.0,
                  on_downloaded: Callable[[int], None] | None = None,
                  client: httpx.Client | None = None, lanes: int = 1,
                  rate_bps: int = 0,
                  proxy: httpx.Proxy | None = None) -> HubDownloads | None:
        """The enrolled hub's download route, or None when not enrolled. ``client``: an
        existing client for the same hub and certificate (its connections are reused);
        ``proxy``: else, the hospital's proxy towards the hub (``hub.proxy``)."""
        enrolment = load_enrolment(home)
        if enrolment is None:
            return None
        return cls(enrolment.url, None if client else enrolment.ssl_context(), timeout_s,
                   on_downloaded, client=client, lanes=lanes, rate_bps=rate_bps,
                   proxy=proxy)

    def close(self) -> None:
        if self.owns_client:
            self.client.close()

    def warm(self) -> None:
        """Tiny requests (empty searches), one per lane at once: opens that many connections
        to the hub, or keeps the idle ones from expiring, so that a download's lanes pay no
        handshakes. An error is only logged by the caller."""
        if self.lanes <= 1:
            self._note_features(self.client.post(self.search_url, json={"patients": []}))
            return
        with ThreadPoolExecutor(self.lanes, thread_name_prefix="pas-warm") as pool:
            for answer in pool.map(lambda _: self.client.post(
                    self.search_url, json={"patients": []}), range(self.lanes)):
                self._note_features(answer)

    def _note_features(self, answer: httpx.Response) -> None:
        """What the hub's downloads offer, as its search answers (or refusals) list it."""
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            features = answer.json().get("features") or ()
            self.hub_has_lanes, self.hub_has_priors = "lanes" in features, "priors" in features

    def search(self, patients: list[tuple[str, str]]) -> list[list[dict[str, Any]] | Exception]:
        """Several patients' studies (QIDO-RS rows, as ``RegionClient.search_studies``) in
        one round trip to the hub: a list, in order, of rows or the error for that patient.
        Raises DownloadUnavailable when the hub offers no such search (use QIDO-RS through
        the region proxy), DownloadError when the request fails."""
        body = {"patients": [{"patient_id": p, "issuer": i} for p, i in patients]}
        # The hub reads at most MAX_SEARCH_BYTES of each patient's archive answer and writes
        # it back no longer: an answer past that (and a little for the frame) is refused, not
        # held (invariant 8).
        cap = (MAX_SEARCH_BYTES + 4096) * max(len(patients), 1) + 65536
        try:
            with self.client.stream("POST", self.search_url, json=body) as answer:
                content = _read_capped(answer, cap)
        except httpx.HTTPError as exc:
            raise DownloadError(f"search of {counted(len(patients), 'patient')}: "
                                f"{error_words(exc)}") from exc
        if self.on_downloaded is not None:
            self.on_downloaded(answer.num_bytes_downloaded)
        if content is None:
            raise DownloadError(f"search of {counted(len(patients), 'patient')}: the hub's "
                                f"answer is over {cap} bytes: not read further")
        # The body read (decoded): as a whole answer for what follows.
        answer = httpx.Response(answer.status_code, content=content, request=answer.request,
                                headers={"content-type": answer.headers.get("content-type", "")})
        self._note_features(answer)
        if answer.status_code in (404, 405, 501):
            raise DownloadUnavailable(f"the hub answers {answer.status_code} to {SEARCH_PATH}")
        if answer.status_code != 200:
            raise DownloadError.refused(f"search of {counted(len(patients), 'patient')}",
                                        answer)
        try:
            results = answer.json()["results"]
        except (ValueError, KeyError, TypeError):
            raise DownloadError("the hub's search answer is not {\"results\": [...]}") from None
        if not isinstance(results, list) or len(results) != len(patients):
            raise DownloadError(f"the hub answered {len(results)} searches for "
                                f"{len(patients)}")
        out: list[list[dict[str, Any]] | Exception] = []
        for (patient, _), result in zip(patients, results, strict=True):
            if isinstance(result, dict) and isinstance(result.get("studies"), list):
                out.append(result["studies"])
            else:
                problem = result if isinstance(result, dict) else {}
                out.append(DownloadError(f"search of patient {patient}: "
                                         f"{problem.get('error', 'bad answer')}: "
                                         f"{problem.get('detail', '')}"))
        return out

    def fetch(self, study_uid: str, on_instance: Callable[[str, bytes], Any], *,
              series_uid: str | None = None, have: set[str] | None = None,
              bucket_bytes: int | None = None,
              before_bucket: Callable[[], None] = lambda: None,
              on_bucket: Callable[[list[Any]], None] = lambda done: None) -> DownloadResult:
        """Download the study (or series) but ``have``; ``on_instance(uid, file)`` is called
        once per verified instance, from worker threads, then ``on_bucket`` with what those
        calls returned for the instances a bucket completed (one commit per bucket for the
        caller's bookkeeping). Raises DownloadUnavailable (fall back to WADO-RS) or
        DownloadError; instances handed over before an error stay."""
        item = DownloadItem(study_uid, on_instance, set(have or ()), series_uid, on_bucket)
        body = item.request()
        if bucket_bytes:
            body["bucket_bytes"] = bucket_bytes
        self._stream(body, [item], False, before_bucket)
        if item.error is not None:
            raise item.error
        return item.result

    def fetch_many(self, items: list[DownloadItem], *, bucket_bytes: int | None = None,
                   before_bucket: Callable[[], None] = lambda: None) -> None:
        """Several studies in one request and one stream, one after the other (one TCP slow
        start and one queue on the WAN instead of one per study). Each item's ``done`` is set
        (and ``on_done`` called) as soon as its own end frame arrived and its files are filed,
        with ``result`` or ``error`` (DownloadError) set; a cut of the stream fails the items
        not done yet. Raises BatchUnavailable before anything was sent when the hub takes one
        study per request only (use :meth:`fetch` per item)."""
        body: dict[str, Any] = {"studies": [item.request() for item in items]}
        if bucket_bytes:
            body["bucket_bytes"] = bucket_bytes
        self._stream(body, items, True, before_bucket)

    def fetch_priors(self, patients: Iterator[dict[str, Any]],
                     on_found: Callable[[dict[str, Any]], list[DownloadItem]], *,
                     bucket_bytes: int | None = None,
                     before_bucket: Callable[[], None] = lambda: None) -> list[DownloadItem]:
        """Search several patients, have the hub choose their priors by the rule each names,
        and download the ones the site lacks, in one request (``appliance.hub.priors``).
        ``patients`` is consumed as the request's body is sent (NDJSON, a line each): the
        hub searches each as its line arrives, while the caller may still be gathering the
        next ones. ``on_found(entry)`` is called for each patient's "found" frame as it comes
        (its index, the chosen studies and the part of the stream of each, or its search's
        error) and returns the items of the parts it adds, in order; each item is then done
        as in :meth:`fetch_many`. Raises DownloadUnavailable when the hub has no such route,
        DownloadRefused when it refuses the request, the stream's error when it was cut
        before every patient was found."""
        options: dict[str, Any] = {}
        if bucket_bytes:
            options["bucket_bytes"] = bucket_bytes
        items: list[DownloadItem] = []
        sent: list[dict[str, Any]] = []
        seen: set[int] = set()
        all_sent = [False]

        def lines() -> Iterator[dict[str, Any]]:
            for patient in patients:
                sent.append(patient)  # before the hub can name it
                yield patient
            all_sent[0] = True

        def found(entry: Any) -> list[DownloadItem]:
            number = entry.get("patient") if isinstance(entry, dict) else None
            if not isinstance(number, int) or not 0 <= number < len(sent) or number in seen:
                raise DownloadError(f"the hub's priors answer names patient {number!r} "
                                    f"of {len(sent)}")
            seen.add(number)
            return on_found(entry)

        cut = self._stream(StreamedBody(options, lines()), items, True, before_bucket,
                           self.priors_url, found)
        # Also when the request died before its body was all sent (a hub that does not
        # answer: nothing of it left): the patients not sent yet are told the cut, not that
        # the hub's answer "ended without a word" of them.
        if cut is not None and (len(seen) < len(sent) or not all_sent[0]):
            raise cut
        return items

    def _stream(self, body: Body, items: list[DownloadItem], batched: bool,
                before_bucket: Callable[[], None], url: str | None = None,
                on_found: Callable[[Any], list[DownloadItem]] | None = None,
                ) -> Exception | None:
        """Send the request, read the frames, hand each bucket to the workers; the error that
        cut the stream, if any (the items are told). ``on_found`` (the priors route): the
        items come from the answer's "found" frames, in part order."""
        url = url or self.url
        reader = FrameReader()
        assembler = Assembler(large=self.large_file, large_above=self.large_above)
        lock = threading.Lock()
        slots = threading.Semaphore(self.workers)
        ended: dict[str, Any] | None = None
        buckets = 0
        cut: Exception | None = None
        what = f"download of {items[0].study_uid}" if not batched \
            else f"download of {counted(len(items), 'study', 'studies')}" if on_found is None \
            else "priors request"

        def item_of(header: dict[str, Any], key: str) -> DownloadItem:
            if not batched:
                return items[0]
            number = header.get(key)
            if not isinstance(number, int) or not 0 <= number < len(items):
                raise DownloadError(f"a frame names study {number!r} of {len(items)}")
            return items[number]

        def settle(item: DownloadItem, error: Exception | None = None) -> None:
            """Finish the item once its end frame and all its buckets are in (or on error)."""
            with lock:
                if item.done.is_set():
                    return
                if error is None:
                    if item.ended is None or item.outstanding:
                        return
                    got, sent = (item.result.instances, item.result.buckets), (
                        item.ended.get("instances"), item.ended.get("buckets"))
                    if got != sent:
                        error = DownloadError(
                            f"download of {item.study_uid}: the hub sent "
                            f"{counted(sent[0], 'instance')} in {counted(sent[1], 'bucket')}, "
                            f"{got[0]} in {got[1]} arrived")
                item.error = error if item.error is None else item.error
                item.done.set()
            item.on_done(item)

        def unpack(item: DownloadItem, payload: bytes) -> None:
            try:
                self._unpack(payload, assembler, item, slots)
            except Exception as exc:
                settle(item, exc if isinstance(exc, DownloadError) else DownloadError(str(exc)))
            else:
                settle(item)

        # Unpacking and filing run beside the reading, so the link keeps flowing while a
        # bucket's JPEG-LS decodes and its files are fsynced; ``slots`` bounds the buckets held.
        wire_bytes = [0]  # what crossed the WAN, also if cut
        with ThreadPoolExecutor(self.workers, thread_name_prefix="pas-download") as pool:
            try:
                with contextlib.closing(self._answer(url, body, what, batched,
                                                     wire_bytes)) as answer:
                    for chunk in answer:
                        for header, payload in reader.feed(chunk):
                            if "error" in header:
                                problem = DownloadError(f"the hub: {header['error']}: "
                                                        f"{header.get('detail', '')}")
                                if batched and "study" in header:
                                    settle(item_of(header, "study"), problem)
                                    continue
                                raise problem
                            if "found" in header and on_found is not None:
                                items.extend(on_found(header["found"]))
                                continue
                            if header.get("end"):
                                ended = header
                                continue
                            if batched and "study_end" in header:
                                item = item_of(header, "study_end")
                                with lock:
                                    item.ended = header
                                settle(item)
                                continue
                            item = item_of(header, "study")
                            assembler.announce(header.get("instances") or [])
                            before_bucket()
                            slots.acquire()
                            with lock:
                                item.outstanding += 1
                            item.result.buckets += 1
                            buckets += 1
                            pool.submit(unpack, item, payload)
                if ended is None:
                    raise DownloadError(f"{what} cut after {counted(buckets, 'bucket')} "
                                        "(no end frame)")
                if ended.get("buckets") != buckets:
                    raise DownloadError(f"{what}: the hub sent "
                                        f"{counted(ended.get('buckets'), 'bucket')}, "
                                        f"{buckets} arrived")
            except httpx.HTTPError as exc:
                cut = DownloadError(f"{what} cut after {counted(buckets, 'bucket')}: "
                                    f"{error_words(exc)}")
                cut.__cause__ = exc  # what cut it: the link (callers tell the two apart)
            except DownloadError as exc:
                cut = exc
            finally:
                if self.on_downloaded is not None and wire_bytes[0]:
                    self.on_downloaded(wire_bytes[0])
                pool.shutdown(wait=True)
                assembler.discard()  # instances the stream left incomplete
        for item in items:
            item.result.wire_bytes = wire_bytes[0]
            if not batched and cut is None:
                item.ended = ended  # a single study's counts are the stream's
            settle(item, cut)  # without a cut: done if its end frame came
            settle(item, DownloadError(f"{what}: the stream ended without {item.study_uid}"))
        return cut

    def _answer(self, url: str, body: Body, what: str, batched: bool,
                wire: list[int]) -> Iterator[bytes]:
        """The answer's bytes as the network gives them (a frame goes to the workers as soon
        as its last byte is in), over one connection or over lanes; ``wire[0]`` follows what
        crossed the WAN. Raises as :meth:`_refused`, or httpx errors / DownloadError."""
        if self.lanes > 1 and self.hub_has_lanes:
            yield from self._striped(url, body, what, batched, wire)
            return
        with self.client.stream("POST", url, **_content(body)) as answer:
            if answer.status_code != 200:
                answer.read()
                self._refused(answer, what, batched)
            for chunk in answer.iter_bytes():
                wire[0] = answer.num_bytes_downloaded
                yield chunk

    def _striped(self, url: str, body: Body, what: str, batched: bool,
                 wire: list[int]) -> Iterator[bytes]:
        """The answer over ``self.lanes`` connections at once (appliance.transfer.lanes):
        lane 0 is the download request, the others join it; their chunks put back in order."""
        lane_id = uuid.uuid4().hex
        merge = Reassembly(self.lanes)
        answers: dict[int, httpx.Response] = {}
        refused: list[httpx.Response] = []
        lane0_answered = threading.Event()
        lanes = {"id": lane_id, "count": self.lanes, "rate_bps": self.rate_bps}
        first: Body = StreamedBody({**body.options, "lanes": lanes}, body.lines) \
            if isinstance(body, StreamedBody) else {**body, "lanes": lanes}

        def lane(number: int) -> None:
            error: Exception | None = None
            try:
                where, request = (url, first) if number == 0 else (
                    self.lanes_url, {"id": lane_id, "lane": number})
                with self.client.stream("POST", where, **_content(request)) as answer:
                    answers[number] = answer
                    if answer.status_code != 200:
                        answer.read()
                        if number == 0:
                            refused.append(answer)
                        raise DownloadError.refused(f"{what}: lane {number}", answer)
                    if number == 0:
                        lane0_answered.set()
                    reader = LaneReader()
                    for data in answer.iter_bytes():
                        for offset, chunk in reader.feed(data):
                            if not merge.put(offset, chunk):
                                return  # the reader gave up
                    reader.finish()
            except DownloadError as exc:
                error = exc
            except (httpx.HTTPError, LaneFormatError) as exc:
                error = DownloadError(f"{what} cut: lane {number}: {type(exc).__name__}: {exc}")
                error.__cause__ = exc  # what cut it (the link, or a bad lane frame)
            except Exception as exc:  # a lane never ends without telling the reader
                error = DownloadError(f"{what}: lane {number}: {type(exc).__name__}: {exc}")
            finally:
                if number == 0:
                    lane0_answered.set()
                merge.lane_ended(error)

        threads = [threading.Thread(target=lane, args=(n,), name=f"pas-download-lane{n}",
                                    daemon=True) for n in range(self.lanes)]
        for thread in threads:
            thread.start()
        try:
            try:
                for chunk in merge:
                    wire[0] = sum(a.num_bytes_downloaded for a in list(answers.values()))
                    yield chunk
            except LaneFormatError as exc:
                raise DownloadError(f"{what}: {exc}") from None
            for thread in threads:
                thread.join()
        except DownloadError:
            # Lane 0's own refusal (an unknown study...) says more than its joins' 404.
            lane0_answered.wait(10)
            if refused:
                self._refused(refused[0], what, batched)
            raise
        finally:
            merge.abort()  # lanes still reading stop at their next chunk
            wire[0] = sum(a.num_bytes_downloaded for a in list(answers.values()))

    @staticmethod
    def _unpack(payload: bytes, assembler: Assembler, item: DownloadItem,
                slots: threading.Semaphore) -> int:
        done: list[Any] = []
        try:
            for piece in _pieces(payload):
                whole = assembler.add(piece.sop_instance_uid, piece.offset, piece.total_size,
                                      piece.data)
                if whole is not None:
                    done.append(item.on_instance(piece.sop_instance_uid, whole))
                    with assembler.lock:
                        item.result.instances += 1
                        item.result.filed.add(piece.sop_instance_uid)
            return len(done)
        finally:
            try:
                item.on_bucket(done)  # also after a failure: what was filed is accounted for
            finally:
                with assembler.lock:
                    item.outstanding -= 1
                slots.release()

    @staticmethod
    def _refused(answer: httpx.Response, what: str, batched: bool) -> None:
        try:
            problem = answer.json()
        except ValueError:
            problem = None
        if not isinstance(problem, dict) or "error" not in problem:
            if answer.status_code in (404, 405):  # no such route: a hub without downloads
                raise DownloadUnavailable(f"the hub answers {answer.status_code} to "
                                          f"{DOWNLOADS_PATH}")
            raise DownloadRefused(f"{what}: HTTP {answer.status_code} {answer.text[:200]}",
                                  answer.status_code, problem)
        detail = str(problem.get("detail", ""))
        if batched and answer.status_code == 422 and detail.startswith("study_uid:"):
            # A hub of before the batched form reads the top-level study_uid only.
            raise BatchUnavailable(f"the hub takes one study per download: {detail}")
        raise DownloadRefused(f"{what}: HTTP {answer.status_code} {problem['error']}: {detail}",
                              answer.status_code, problem)


def _read_capped(answer: httpx.Response, cap: int) -> bytes | None:
    """The answer's body, or None once it is over ``cap`` bytes (the rest not read)."""
    chunks, size = [], 0
    for chunk in answer.iter_bytes():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _pieces(payload: bytes) -> Iterator[Any]:
    try:
        yield from unpack_bucket(payload)
    except BucketFormatError as exc:
        raise DownloadError(f"a bucket does not unpack: {exc}") from None
