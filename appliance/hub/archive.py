"""The regional archive behind the hub: ``embedded`` (files + SQLite) or ``dicomweb`` (STOW-RS).

Owns: handing rebuilt, verified files to the archive and deciding whether it accepted every
one of them. May not touch: the hub's own database, receipts (``commit.py`` signs only after
:meth:`store` returned without raising).

``embedded`` files each file's exact bytes through :mod:`appliance.store` (a Database and a
Spool under ``$PAS_HUB_HOME/archive``, origin ``regional``), so what it holds is bit-exact.
``dicomweb`` POSTs ``multipart/related; type="application/dicom"`` to ``{url}/studies``,
streamed from the files with a known Content-Length (no chunked encoding, bounded memory),
and reads the answer's ReferencedSOPSequence / FailedSOPSequence per instance. A DICOMweb
archive may answer success for a SOP Instance UID it already holds and keep the bytes it had
(Orthanc with ``OverwriteInstances: false`` does, silently): so before each batch one QIDO-RS
query (UID list matching) asks which of its UIDs are held already, and after the STOW each of
those is read back (WADO-RS, ``transfer-syntax=*``) and accepted only if its SHA-256 is the one
sent, whatever the STOW answered for it (an archive that refuses duplicates, as Microsoft's
and Google's do with a 409, refuses the re-send of a UID it holds bit-exact; the read-back is
what says whether the bytes are the ones sent). A new study costs one small query per batch;
only re-sent UIDs are read back. The question, the STOW and the read-back of a batch hold a
lock per SOP Instance UID of the batch (sorted order): two transfers carrying one UID with
other bytes (a corrected version sent while the first is still being archived, or two sites)
both asked before either STOW landed, both heard "not held", and both were receipted while
Orthanc kept only the first.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from appliance.locks import KeyedLocks
from appliance.transfer.http import BearerAuth, http_client, shown_url
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.hub.config import ArchiveSection, HubSettings

log = logging.getLogger("pas.hub.archive")

CHUNK = 1 << 20


class ArchiveTrustError(OSError):
    """``archive.ca_file`` cannot be read as a bundle of CA certificates: the hub does not
    start (``cannot start the hub: archive.ca_file ...``)."""


def archive_verify(archive: ArchiveSection) -> ssl.SSLContext:
    """How every client of the hub to the archive verifies its certificate (the STOWs and
    questions here, the region proxy, the downloads' reads, the priors' searches): the
    bundle ``archive.ca_file`` names, else the system's store. Until 2026-12-05 they used
    httpx's own default (certifi's list of public CAs): a regional PACS under the region's
    private CA was reached over https:// only with SSL_CERT_FILE in the hub's environment,
    which no document said, and http:// to any host was taken."""
    return _verify_context(str(archive.ca_file) if archive.ca_file else None)


def archive_auth(archive: ArchiveSection) -> httpx.Auth | None:
    """The PACS's credentials (``archive.bearer_token``, else ``username``/``password`` as
    HTTP Basic), sent on the hub's requests to it (:func:`archive_client_options`). Before
    them the URL's ``user:password@`` was the only place to put them, and it was logged with
    every failure."""
    if archive.bearer_token:
        return BearerAuth(archive.bearer_token)
    if archive.username is not None:
        return httpx.BasicAuth(archive.username, archive.password or "")
    return None


def archive_client_options(archive: ArchiveSection) -> dict[str, Any]:
    """What every client of the hub to the archive is built with (:func:`http_client` or
    :func:`async_http_client`, which read no proxy from the environment): one place, so the
    STOWs, the region proxy and the downloads' reads verify the same CA and send the same
    credentials, the priors searches (hub/priors.py) too."""
    return {"timeout": archive.timeout_s, "verify": archive_verify(archive),
            "auth": archive_auth(archive)}


@functools.lru_cache(maxsize=4)
def _verify_context(ca_file: str | None) -> ssl.SSLContext:
    """One context per bundle for the hub's life (a context is shared safely between
    threads and event loops; a bundle replaced is read at the next start)."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ValueError) as exc:  # missing, unreadable, or no certificate in it
        raise ArchiveTrustError(f"archive.ca_file {ca_file}: not a readable PEM bundle of CA "
                                f"certificates ({exc})") from None


def trust_problem(exc: BaseException, archive: ArchiveSection) -> str | None:
    """The words for a failure to trust the archive's certificate, if ``exc`` is one (None
    otherwise): what the check said, and the key that names what it is checked against."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            against = (f"the CA bundle in archive.ca_file ({archive.ca_file})" if
                       archive.ca_file else "the system's store (archive.ca_file not set)")
            return (f"the hub does not trust the archive's certificate "
                    f"({current.verify_message or current.reason}), checked against {against}")
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@dataclass(frozen=True)
class RebuiltInstance:
    sop_instance_uid: str
    path: Path
    size: int
    sha256: str


class ArchiveRefused(Exception):
    """The archive did not accept every instance; ``refused`` names those it did not, and
    ``reasons`` (when known) says why for each one (the commit's 502 quotes it)."""

    def __init__(self, message: str, refused: list[str],
                 reasons: dict[str, str] | None = None):
        super().__init__(message)
        self.refused = refused
        self.reasons = reasons or {}


class Archive(Protocol):
    kind: str

    def store(self, instances: list[RebuiltInstance], site: str) -> None: ...


class EmbeddedArchive:
    """Files + SQLite on the hub itself; what ``make demo`` uses."""

    kind = "embedded"

    def __init__(self, root: Path):
        from appliance.store.db import Database
        from appliance.store.spool import Spool

        self.root = Path(root)
        self.db = Database(self.root / "pas.sqlite")
        self.spool = Spool(self.root / "spool")
        self.spool.remove_temp_files()
        self.adopt_unindexed()

    def adopt_unindexed(self) -> int:
        """Index the files of the archive's spool that its index does not name; how many.

        A hub restored from ``pas hub backup`` gets its index as of the backup and its
        ``archive/spool`` from the storage's backup: the instances committed after the
        backup were in the spool and in no row, so the region's QIDO-RS and WADO-RS never
        found them, although their sites held a receipt (and may have evicted them). Run at
        start, before anything is archived (no file of a batch being filed is taken for
        one), one walk of index and spool side by side as an appliance's start-up
        recovery does (:func:`appliance.store.cache.reconcile`: bounded memory); each file
        re-hashed, one whose bytes are not its name left alone and logged."""
        from appliance.store.cache import reconcile
        from appliance.store.index import record_instance

        adopted = 0
        for item in reconcile(self.db, self.spool):
            if item.indexed_size is not None or item.size_on_disk is None:
                continue
            path = self.spool.path(item.path)
            try:
                record = self._record(path)
                stored, _created = self.spool.write(_chunks(path))
            except Exception as exc:  # an unreadable file: left as it is, said
                log.warning("embedded archive: %s is in no row and cannot be read (%s): left "
                            "alone", path, exc)
                continue
            if stored.path != item.path:
                log.warning("embedded archive: %s is in no row and its bytes are not its name "
                            "(SHA-256 %s): left alone", path, stored.sha256)
                continue
            with self.db.transaction():
                record_instance(self.db, record, stored, origin="regional",
                                source_address="adopted at start")
            adopted += 1
        if adopted:
            log.warning("embedded archive: %s in its spool but in no row of its index (a hub "
                        "restored from a backup older than its images) indexed again",
                        counted(adopted, "instance"))
        return adopted

    def start_backfill(self, stop: threading.Event) -> None:
        """Its index is the appliance's (schema 18 included): the instances archived before
        get their Rows, Columns, BitsAllocated and NumberOfFrames from the same background
        backfill (appliance/ops/backfill.py), for the region's QIDO-RS."""
        from appliance.ops.backfill import HeaderBackfill

        backfill = HeaderBackfill(self.db, self.spool)
        threading.Thread(target=backfill.run, args=(stop,), name="pas-hub-backfill",
                         daemon=True).start()

    def store(self, instances: list[RebuiltInstance], site: str) -> None:
        # Files are parsed and fsynced by the spool first, outside any transaction; then one
        # short SQLite transaction records the batch (the archiver hands batches of
        # ``instances_per_request``): the write lock is never held across a whole transfer,
        # so an urgent transfer's commit does not wait behind a large routine one.
        refused, filed = self._file_all(instances)
        if filed:
            from appliance.store.index import record_instance

            with self.db.transaction():
                for record, stored in filed:
                    record_instance(self.db, record, stored, origin="regional",
                                    source_address=site)
        if refused:
            raise ArchiveRefused(f"embedded archive refused {counted(len(refused), 'instance')}"
                                 f": {', '.join(refused[:5])}", refused)

    def _record(self, path: Path) -> Any:
        """The index record of a rebuilt file. A deflated one is read as the appliance's
        ingest reads it (inflated a megabyte at a time into a temp file of this archive's
        spool, mapped): pydicom inflated it whole in memory, up to 256 MiB per instance on
        each archiving thread, even for its header only."""
        import mmap

        from pydicom import dcmread
        from pydicom.filereader import read_file_meta_info
        from pydicom.uid import UID

        from appliance.ingest.attributes import instance_record
        from appliance.ingest.reading import read_record
        from appliance.store.inflate import inflated

        syntax = str(read_file_meta_info(path).get("TransferSyntaxUID", "") or "")
        if UID(syntax).is_deflated:
            size = path.stat().st_size

            def from_file(deflated: memoryview, *, limit: int) -> Any:
                # The deflated bytes read from the file a megabyte at a time, not through
                # the mapping (each page of which would count in the hub's memory).
                return inflated(_chunks(path, start=size - len(deflated)), limit=limit,
                                spool=self.spool)

            with open(path, "rb") as handle, \
                    mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    return read_record(view, in_place=True, inflate=from_file)
                finally:
                    view.release()
        ds = dcmread(path, stop_before_pixels=True)
        return instance_record(ds, str(getattr(ds.file_meta, "TransferSyntaxUID", "") or ""))

    def _file_all(self, instances: list[RebuiltInstance]) -> tuple[list[str], list[Any]]:
        """(refused UIDs, [(record, stored file)] written durably to the spool)."""
        from appliance.ingest.attributes import InvalidInstance

        refused, filed = [], []
        for instance in instances:
            try:
                record = self._record(instance.path)
            except (InvalidInstance, Exception) as exc:  # noqa: B014 - any unreadable header
                log.warning("embedded archive refused %s: %s", instance.sop_instance_uid, exc)
                refused.append(instance.sop_instance_uid)
                continue
            stored, _created = self.spool.write(_chunks(instance.path))
            if stored.sha256 != instance.sha256:  # the disk lied between check and copy
                refused.append(instance.sop_instance_uid)
                continue
            filed.append((record, stored))
        return refused, filed


class DicomWebArchive:
    """STOW-RS into the regional PACS (Orthanc with its DICOMweb plugin in the tests)."""

    kind = "dicomweb"

    def __init__(self, archive: ArchiveSection):
        assert archive.url
        self.settings = archive
        self.url = archive.url.rstrip("/")
        self.per_request = archive.instances_per_request
        self.shown = shown_url(self.url)  # as log lines carry it: no userinfo
        self.client = http_client(**archive_client_options(archive))
        self._uids = KeyedLocks()  # one per SOP Instance UID being asked, sent, read back

    @contextlib.contextmanager
    def _owning(self, batch: list[RebuiltInstance]) -> Iterator[None]:
        """Hold the lock of every UID of ``batch`` (sorted: no deadlock between batches that
        share UIDs), so that what the QIDO-RS question said stays true until the STOW and the
        read-back are done: another transfer's STOW of one of these UIDs waits, then finds it
        held and reads it back."""
        with contextlib.ExitStack() as stack:
            for uid in sorted({i.sop_instance_uid for i in batch}):
                stack.enter_context(self._uids(uid))
            yield

    def store(self, instances: list[RebuiltInstance], site: str) -> None:
        refused: dict[str, str] = {}
        for start in range(0, len(instances), self.per_request):
            batch = instances[start:start + self.per_request]
            with self._owning(batch):
                refused.update(self._store_batch(batch))
        if refused:
            named = "; ".join(f"{uid}: {why}" for uid, why in list(refused.items())[:5])
            raise ArchiveRefused(f"DICOMweb archive refused {counted(len(refused), 'instance')}"
                                 f": {named}", list(refused), refused)

    def _store_batch(self, batch: list[RebuiltInstance]) -> dict[str, str]:
        """Ask, STOW, read back one batch (its UIDs' locks held); {refused UID: why}."""
        held, why = self._held(batch)
        if held is None:  # cannot tell what a success would mean: send nothing
            return {i.sop_instance_uid: why for i in batch}
        refused_here, answered = self._post(batch)
        if answered and len(batch) > 1 and len(refused_here) == len(batch):
            # Some archives refuse a whole request for one bad part: ask one by one, so
            # that the answer names the instance(s) really refused. (Not when the archive
            # did not answer at all: that would only wait for more timeouts. Not for the
            # UIDs held already: the read-back below decides for them.)
            refused_here = [uid for instance in batch
                            if instance.sop_instance_uid not in held
                            for uid in self._post([instance])[0]]
        refused = {uid: "not accepted by STOW-RS" for uid in refused_here
                   if uid not in held}
        # A UID held already: the read-back decides, whatever the STOW answered. An archive
        # that refuses duplicates (Microsoft's answers 409, FailureReason 45070; Google's
        # 409) refuses the re-send of a UID it holds bit-exact (a round whose STOW answer
        # was lost, a hub killed between the STOW and recording it archived): taking that
        # refusal refused the transfer's commit at every round, for ever.
        for instance in batch:
            where = held.get(instance.sop_instance_uid)
            if where is not None:
                problem = self._read_back(instance, *where)
                if problem:
                    refused[instance.sop_instance_uid] = problem
        return refused

    def _held(self, batch: list[RebuiltInstance]) -> tuple[dict[str, tuple[str, str]] | None,
                                                            str]:
        """({SOP Instance UID: (study, series)} of the batch's instances the archive holds
        already, "") or (None, why) when it cannot say. One QIDO-RS request with UID list
        matching (PS3.18: comma-separated); the answer is filtered to the batch's UIDs."""
        uids = [i.sop_instance_uid for i in batch]
        try:
            response = self.client.get(
                f"{self.url}/instances",
                params={"SOPInstanceUID": ",".join(uids),
                        "includefield": ["0020000D", "0020000E"]},
                headers={"Accept": "application/dicom+json"})
        except httpx.HTTPError as exc:
            why = trust_problem(exc, self.settings) or str(exc)
            log.warning("QIDO-RS to %s failed: %s", self.shown, why)
            return None, f"cannot ask the archive whether it holds this UID already: {why}"
        if response.status_code == 204:
            return {}, ""
        try:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            answer = response.json() if response.content.strip() else []
            found = {_value(item, "00080018"): (_value(item, "0020000D"),
                                                _value(item, "0020000E"))
                     for item in answer}
        except (ValueError, AttributeError, TypeError) as exc:
            log.warning("QIDO-RS to %s: unusable answer: %s", self.shown, exc)
            return None, ("cannot ask the archive whether it holds this UID already: QIDO-RS "
                          f"answered {exc}")
        return {uid: found[uid] for uid in uids if uid in found}, ""

    def _read_back(self, instance: RebuiltInstance, study: str, series: str) -> str:
        """"" when the archive now holds exactly the bytes sent for an instance it held before
        the STOW (an idempotent re-send, or an archive that overwrites); else why not."""
        from appliance.hub.staging import ArchiveFailed, PartsToFiles, boundary

        uid = instance.sop_instance_uid
        parts: list[tuple[int, str]] = []
        try:
            with tempfile.TemporaryDirectory(dir=instance.path.parent) as folder, \
                    self.client.stream(
                        "GET", f"{self.url}/studies/{study}/series/{series}/instances/{uid}",
                        headers={"Accept": 'multipart/related; type="application/dicom"; '
                                 "transfer-syntax=*"}) as response:
                if response.status_code != 200:
                    return (f"held by the archive before this STOW, and reading it back "
                            f"(WADO-RS) answered {response.status_code}")
                parser = PartsToFiles(boundary(response.headers.get("content-type", "")),
                                      Path(folder), lambda _p, size, sha: parts.append((size,
                                                                                        sha)))
                try:
                    for chunk in response.iter_bytes():
                        parser.feed(chunk)
                finally:
                    parser.close()
        except (httpx.HTTPError, ArchiveFailed, OSError) as exc:
            why = trust_problem(exc, self.settings) or exc
            return f"held by the archive before this STOW, and reading it back failed: {why}"
        if len(parts) != 1:
            return (f"held by the archive before this STOW, and reading it back gave "
                    f"{len(parts)} parts instead of 1")
        if parts[0][1] != instance.sha256:
            log.warning("the archive holds %s with SHA-256 %s and kept it; %s was sent", uid,
                        parts[0][1], instance.sha256)
            return (f"the archive already holds this SOP Instance UID with other bytes "
                    f"(SHA-256 held {parts[0][1]}, sent {instance.sha256}) and kept them: "
                    "a corrected version is not confirmed (docs/protocol.md)")
        return ""

    def _post(self, batch: list[RebuiltInstance]) -> tuple[list[str], bool]:
        """(SOP Instance UIDs not accepted, whether the archive answered at all)."""
        boundary = f"pas-{uuid.uuid4().hex}"
        heads = [f"--{boundary}\r\nContent-Type: application/dicom\r\n"
                 f"Content-Length: {i.size}\r\n\r\n".encode() for i in batch]
        tail = f"--{boundary}--\r\n".encode()
        length = sum(len(h) + i.size + 2 for h, i in zip(heads, batch, strict=True)) + len(tail)

        def body() -> Iterator[bytes]:
            for head, instance in zip(heads, batch, strict=True):
                yield head
                yield from _chunks(instance.path)
                yield b"\r\n"
            yield tail

        uids = [i.sop_instance_uid for i in batch]
        try:
            response = self.client.post(
                f"{self.url}/studies", content=body(),
                headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                         f"boundary={boundary}", "Content-Length": str(length),
                         "Accept": "application/dicom+json"})
        except httpx.HTTPError as exc:
            log.warning("STOW-RS to %s failed: %s", self.shown,
                        trust_problem(exc, self.settings) or exc)
            return uids, False
        if response.status_code not in (200, 202):
            log.warning("STOW-RS to %s answered %s: %s", self.shown, response.status_code,
                        response.text[:300])
            return uids, True
        try:
            answer: dict[str, Any] = response.json()
        except ValueError:
            return uids, True
        accepted = {str(item.get("00081155", {}).get("Value", [""])[0])
                    for item in answer.get("00081199", {}).get("Value", [])}
        return [uid for uid in uids if uid not in accepted], True


def open_archive(settings: HubSettings) -> Archive:
    if settings.archive.kind == "dicomweb":
        return DicomWebArchive(settings.archive)
    return EmbeddedArchive(settings.archive_dir)


def _value(item: dict[str, Any], tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON object, "" when absent."""
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _chunks(path: Path, start: int = 0) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(start)
        while chunk := handle.read(CHUNK):
            yield chunk
