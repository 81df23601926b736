"""Archiving while the buckets arrive: rebuild, verify and archive each instance as soon as
every piece of it is held, so that the commit only has the tail left to do.

Why: the commit used to rebuild and STOW the whole study after the last bucket, serially, while
the link sat idle (MR: rebuild 1.5 s + STOW-RS 4-5 s after 1.7 s of wire time). Now, after each
durable bucket PUT, a background worker applies the new bucket's pieces to the transfer's files
under ``$PAS_HUB_HOME/work/<id>``, checks size and SHA-256 of every instance whose listed
buckets (``instances[].buckets`` of the manifest) are all applied, hands the good ones to the
archive in batches, and records each batch the archive confirmed in ``archived_instances``
(through :mod:`appliance.store.hub`). :meth:`Archiver.finish`, called by the commit, applies
whatever is left, checks every remaining instance and archives it; the commit signs only once
every instance of the manifest is recorded archived (invariant 2 still holds: nothing is
receipted before the archive confirmed each instance, bit-exact).

Owns: the work files, the background workers (``archive.workers`` threads per hub, a queue of
transfer ids in priority order, each transfer handled by one thread at a time), the requests
to the archive (``archive.requests`` at once per hub, in priority order: a pool shared by every
transfer; a background round hands its batches to it and goes on applying the next bucket
instead of waiting, so the archive is never idle between two buckets of one study), which
buckets each transfer has applied (in memory: a restarted hub wipes ``work/`` and re-applies the
buckets of instances not yet archived). May not touch: SQL (``appliance.store.hub``), HTTP,
receipts (``commit.py``).

Memory: one bucket's plaintext and pieces at a time per thread (invariant 8); files go to the
archive streamed. Instances of a transfer that never commits may be archived anyway: they passed
the same SHA-256 check, and both archives take a re-sent instance without duplicating it. Never
one that a later committed transfer of the same site and study names with other bytes
(:func:`_superseded`): the site left this transfer and corrected the instance since, and archived
now the stale version would be the region's current one again (docs/protocol.md). Never one
whose SOP Instance UID another site archived with other bytes (:func:`_another_site`): one
hospital's upload must never change what the region serves for another's images; checked before
each round and again under a lock per UID around each batch's request (``archived_by_site``,
hub schema 14).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import logging
import queue
import shutil
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.hub import manifest_json
from appliance.hub.archive import ArchiveRefused, RebuiltInstance
from appliance.locks import KeyedLocks
from appliance.store import hub as store
from appliance.words import counted

if TYPE_CHECKING:
    from appliance.hub.app import Hub

log = logging.getLogger("pas.hub.archiver")

# The reason :meth:`Archiver._store` gives for an instance it did not hand to the archive
# because another site archived its UID with other bytes (not the archive's refusal).
ANOTHER_SITE = "another site archived this SOP Instance UID with other bytes"


class CommitRefused(Exception):
    """The commit cannot complete; ``status``/``error``/``detail``/``extra`` form the answer."""

    def __init__(self, status: int, error: str, detail: str, **extra: Any):
        super().__init__(detail)
        self.status, self.error, self.detail, self.extra = status, error, detail, extra


@dataclass
class _Transfer:
    """What this process has rebuilt of one transfer so far."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    applied: set[int] = field(default_factory=set)
    key: bytes | None = None
    # Batches handed to the archive by background rounds and not answered yet (guarded by
    # ``flight``, not ``lock``: the answers arrive on the request threads).
    flight: threading.Lock = field(default_factory=threading.Lock)
    inflight: set[str] = field(default_factory=set)
    futures: set[Future[dict[str, str]]] = field(default_factory=set)
    refused_ahead: bool = False  # the archive refused a batch: leave the rest to the commit
    # UIDs another site archived with other bytes: left by the background rounds (the commit
    # checks them again and refuses), said once per transfer in the log.
    another_site: set[str] = field(default_factory=set)
    another_site_said: bool = False


class _Requests:
    """``size`` threads calling the archive, the lowest priority number first (then FIFO)."""

    def __init__(self, size: int):
        self._queue: queue.PriorityQueue[tuple[int, int, Future[Any], Any, tuple[Any, ...]]] = (
            queue.PriorityQueue())
        self._order = itertools.count()
        for number in range(size):
            threading.Thread(target=self._run, name=f"pas-hub-archive-{number}",
                             daemon=True).start()

    def submit(self, priority: int, fn: Any, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((priority, next(self._order), future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            _priority, _order, future, fn, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                future.set_exception(exc)


class Archiver:
    """Background rebuild-and-archive for a hub; ``notify`` after each durable bucket."""

    def __init__(self, hub: Hub, workers: int = 1, requests: int | None = None):
        self.hub = hub
        self._queue: queue.PriorityQueue[tuple[int, int, str]] = queue.PriorityQueue()
        self._queued: set[str] = set()
        self._transfers: dict[str, _Transfer] = {}
        self._guard = threading.Lock()
        self._order = itertools.count()
        # Requests to the archive, shared by every round (background and commits): bounded.
        self._requests = _Requests(requests or workers)
        # Held around a batch's check of archived_by_site, its request and its record: two
        # sites' batches of one UID are never both checked before either is recorded.
        self._uid_locks = KeyedLocks()
        for transfer_id, priority in store.unfinished_transfers(hub.db):  # a restart resumes
            self.notify(transfer_id, priority)
        for number in range(workers):
            threading.Thread(target=self._work, name=f"pas-hub-archiver-{number}",
                             daemon=True).start()

    def notify(self, transfer_id: str, priority: int = 0) -> None:
        """A bucket of ``transfer_id`` is durable: archive what became complete (once queued,
        a transfer is not queued again before a worker took it; lower priority goes first)."""
        with self._guard:
            if transfer_id in self._queued:
                return
            self._queued.add(transfer_id)
        self._queue.put((priority, next(self._order), transfer_id))

    def finish(self, transfer_id: str) -> int:
        """Archive everything not archived yet (all buckets are held); returns the number of
        instances of the manifest. Raises :class:`CommitRefused` (422 bad bucket, unexpected
        instance, SHA-256 mismatch; 502 archive refused) and then nothing is receipted."""
        row = store.get_transfer(self.hub.db, transfer_id)
        return self._round(transfer_id, final=True,
                           priority=int(row["priority"]) if row is not None else 0)

    def forget(self, transfer_id: str) -> None:
        """After the receipt: drop the work files and the in-memory state."""
        with self._guard:
            self._transfers.pop(transfer_id, None)
        shutil.rmtree(self.hub.settings.work_dir / transfer_id, ignore_errors=True)

    # --- the work ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            priority, _order, transfer_id = self._queue.get()
            with self._guard:
                self._queued.discard(transfer_id)
            try:
                self._round(transfer_id, final=False, priority=priority)
            except CommitRefused as exc:  # the commit will say it; nothing was archived wrongly
                log.warning("transfer %s: archiving ahead stopped: %s", transfer_id, exc.detail)
            except Exception:
                log.exception("transfer %s: archiving ahead failed (the commit retries)",
                              transfer_id)

    def _state(self, transfer_id: str) -> _Transfer:
        with self._guard:
            return self._transfers.setdefault(transfer_id, _Transfer())

    def _round(self, transfer_id: str, final: bool, priority: int = 0) -> int:
        state = self._state(transfer_id)
        with state.lock:
            row = store.get_transfer(self.hub.db, transfer_id)
            if row is None or row["receipt"] is not None:  # a late notice: nothing to keep
                with self._guard:
                    self._transfers.pop(transfer_id, None)
                return 0
            if final:  # what background rounds handed to the archive is answered first
                self._drain(state)
            elif state.refused_ahead:
                return 0
            manifest = manifest_json.loads(row["manifest"])
            expected = {i["sop_instance_uid"]: i for i in manifest["instances"]}
            numbers = {uid: n for n, uid in enumerate(expected)}
            archived = store.archived_instances(self.hub.db, transfer_id)
            with state.flight:
                inflight = set(state.inflight)
            pending = {uid: i for uid, i in expected.items()
                       if archived.get(uid) != i["sha256"] and uid not in inflight}
            if not pending:
                return len(expected)
            superseded = _superseded(self.hub, row, pending)
            if superseded and final:
                named = ", ".join(f"{s['sop_instance_uid']} (by transfer {s['transfer_id']})"
                                  for s in superseded[:5])
                raise CommitRefused(422, "superseded",
                                    f"{counted(len(superseded), 'instance')} of this transfer "
                                    f"{'was' if len(superseded) == 1 else 'were'} replaced "
                                    "since by a later committed transfer of this site for the "
                                    "study (the same SOP Instance UID, other bytes); archived "
                                    f"now, the stale version would be current again: {named}",
                                    superseded=superseded)
            if superseded:
                log.info("transfer %s: %s superseded by a later receipt of site %s (the same "
                         "UID, other bytes): not archived ahead", transfer_id,
                         counted(len(superseded), "instance"), row["site"],
                         extra={"SITE": row["site"]})
                for entry in superseded:
                    del pending[entry["sop_instance_uid"]]
                if not pending:
                    return len(expected)
            if final:  # refused whole, before anything more of the transfer is archived
                taken = store.archived_by_other_sites(
                    self.hub.db, row["site"], {uid: i["sha256"] for uid, i in pending.items()})
                if taken:
                    raise _another_site(row, taken, expected)
            else:
                pending = {uid: i for uid, i in pending.items()
                           if uid not in state.another_site}
                if not pending:
                    return len(expected)
            buckets = {int(b["idx"]): b for b in store.bucket_rows(self.hub.db, transfer_id)}
            wanted = set(buckets) if final else {
                b for i in pending.values() for b in i.get("buckets", [])} & set(buckets)
            work = self.hub.settings.work_dir / transfer_id
            work.mkdir(parents=True, exist_ok=True)
            for index in sorted(wanted - state.applied):
                self._apply(row, state, buckets[index], expected, pending, numbers, work)
                state.applied.add(index)
            ready = [uid for uid, i in pending.items() if final or (
                i.get("buckets") and set(i["buckets"]) <= state.applied)]
            if not final and ready:  # each instance checked once, as it becomes complete
                taken = store.archived_by_other_sites(
                    self.hub.db, row["site"], {uid: expected[uid]["sha256"] for uid in ready})
                if taken:
                    self._leave_another_site(row, state, taken)
                    ready = [uid for uid in ready if uid not in taken]
            good, mismatch = _check(ready, expected, numbers, work)
            if mismatch and final:
                names = ", ".join(m["sop_instance_uid"] for m in mismatch[:5])
                raise CommitRefused(422, "sha256_mismatch",
                                    f"{counted(len(mismatch), 'rebuilt instance')} "
                                    f"{'differs' if len(mismatch) == 1 else 'differ'} from the "
                                    f"manifest: {names}", mismatch=mismatch)
            if not final:
                self._archive_ahead(transfer_id, row["site"], good, state, priority)
                return len(expected)
            refused = self._archive(transfer_id, row["site"], good, priority)
            raced = [uid for uid, why in refused.items() if why == ANOTHER_SITE]
            if raced:  # another site's batch of these UIDs was recorded since the check
                taken = store.archived_by_other_sites(
                    self.hub.db, row["site"], {uid: expected[uid]["sha256"] for uid in raced})
                raise _another_site(row, {uid: taken.get(uid, ("", "")) for uid in raced},
                                    expected)
            if refused:
                named = "; ".join(f"{uid}: {why}" if why else uid
                                  for uid, why in list(refused.items())[:5])
                raise CommitRefused(502, "archive_refused", f"{self.hub.archive.kind} archive "
                                    f"refused {counted(len(refused), 'instance')}: {named}",
                                    refused=list(refused))
            return len(expected)

    def _drain(self, state: _Transfer) -> None:
        """Wait until every batch a background round handed to the archive is answered."""
        while True:
            with state.flight:
                futures = list(state.futures)
            if not futures:
                return
            for future in futures:
                future.exception()  # waits; the outcome is recorded (or not) by _store

    def _key(self, row: Any, state: _Transfer) -> bytes:
        from appliance.transfer import seal

        if state.key is None:
            manifest = manifest_json.loads(row["manifest"])
            state.key = seal.unwrap_key(base64.b64decode(manifest["wrapped_key"]),
                                        self.hub.pki.transfer_private_key(), row["id"])
        return state.key

    def _apply(self, row: Any, state: _Transfer, bucket: Any, expected: dict[str, Any],
               pending: dict[str, Any], numbers: dict[str, int], work: Path) -> None:
        """Write one bucket's pieces of not-yet-archived instances at their offsets."""
        from appliance.transfer import pack, seal

        index = int(bucket["idx"])
        sealed = (self.hub.settings.buckets_dir / bucket["path"]).read_bytes()
        try:
            plaintext = seal.open_bucket(self._key(row, state), row["id"], index, sealed)
            pieces = list(pack.unpack_bucket(plaintext))
        except ValueError as exc:
            raise CommitRefused(422, "bad_bucket", f"bucket {index} cannot be unpacked: {exc}",
                                bucket=index) from None
        del plaintext, sealed
        for piece in pieces:
            if piece.sop_instance_uid not in expected:
                raise CommitRefused(422, "unexpected_instance",
                                    f"bucket {index} carries {piece.sop_instance_uid}, which "
                                    "the manifest does not list", bucket=index)
            # The piece's place is checked against the manifest's size, not only against the
            # bucket's own header (unpack_bucket's check): written where it said, a piece at
            # a far offset made a sparse work file of that size, hashed whole (18 s per 8 GiB
            # here, twice), and past the file system's limit an OSError and a 500.
            size = expected[piece.sop_instance_uid]["size"]
            end = piece.offset + len(piece.data)
            if piece.total_size != size or end > size:
                raise CommitRefused(422, "bad_bucket",
                                    f"bucket {index} carries bytes {piece.offset}..{end} of a "
                                    f"{piece.total_size}-byte file for {piece.sop_instance_uid}, "
                                    f"which the manifest gives {size} bytes", bucket=index)
        for piece in pieces:
            if piece.sop_instance_uid not in pending:
                continue  # archived already (before a restart, or in an earlier round)
            path = work / f"{numbers[piece.sop_instance_uid]:06d}.dcm"
            with open(path, "r+b" if path.exists() else "wb") as handle:
                handle.seek(piece.offset)
                handle.write(piece.data)

    def _batches(self, instances: list[RebuiltInstance]) -> list[list[RebuiltInstance]]:
        per_request = self.hub.settings.archive.instances_per_request
        return [instances[i:i + per_request] for i in range(0, len(instances), per_request)]

    def _archive(self, transfer_id: str, site: str, instances: list[RebuiltInstance],
                 priority: int) -> dict[str, str]:
        """The commit's batches, through the shared request pool (``archive.requests`` at once:
        Orthanc stores one request while it parses the next); waits for every answer and
        returns the refused UIDs, each with the archive's reason ("" when it gave none)."""
        futures = [self._requests.submit(priority, self._store, transfer_id, site, batch)
                   for batch in self._batches(instances)]
        return {uid: why for future in futures for uid, why in future.result().items()}

    def _archive_ahead(self, transfer_id: str, site: str, instances: list[RebuiltInstance],
                       state: _Transfer, priority: int) -> None:
        """Hand the batches to the request pool without waiting: the round thread goes on
        with the next bucket. Each batch is recorded as the archive confirms it; after a
        refusal (the archive may be down) this transfer archives nothing more ahead, and the
        commit tries again and answers 502 if the archive still refuses."""
        for batch in self._batches(instances):
            uids = {i.sop_instance_uid for i in batch}
            with state.flight:
                state.inflight |= uids
                future = self._requests.submit(priority, self._store, transfer_id, site, batch)
                state.futures.add(future)

            def answered(done: Future[dict[str, str]], uids: set[str] = uids) -> None:
                with state.flight:
                    state.inflight -= uids
                    state.futures.discard(done)
                    error = done.exception()
                    taken = {} if error is not None else {
                        uid: ("", "") for uid, why in done.result().items()
                        if why == ANOTHER_SITE}
                    refused = error is not None or len(done.result()) > len(taken)
                    state.refused_ahead |= refused
                    state.another_site |= set(taken)
                if taken:  # another site's batch of these UIDs was recorded since the check
                    log.warning("transfer %s: %s not archived ahead: another site archived "
                                "%s with other bytes meanwhile: %s", transfer_id,
                                counted(len(taken), "instance"),
                                "its SOP Instance UID" if len(taken) == 1 else
                                "their SOP Instance UIDs", ", ".join(sorted(taken)[:5]))
                if error is not None:
                    log.warning("transfer %s: archiving ahead failed (the commit retries): %s",
                                transfer_id, error)
                elif refused:
                    # Said: it was DEBUG like a batch taken, and nothing told why a transfer
                    # stopped being archived before its commit.
                    log.warning("transfer %s: the %s archive refused %s sent ahead of the "
                                "commit; the rest waits for the commit", transfer_id,
                                self.hub.archive.kind, counted(len(done.result()), "instance"))
                else:
                    # DEBUG: one line per batch made ~70 lines for a handful of transfers;
                    # the commit's line says what was archived.
                    log.debug("transfer %s: %s archived ahead of the commit", transfer_id,
                              counted(len(uids) - len(done.result()), "instance"))

            future.add_done_callback(answered)

    def _store(self, transfer_id: str, site: str,
               batch: list[RebuiltInstance]) -> dict[str, str]:
        """One request to the archive; records what it confirmed; returns what it refused
        (UID -> the archive's reason, "" when it gave none; :data:`ANOTHER_SITE` for a UID
        another site archived with other bytes, which is not handed to the archive).

        The check of ``archived_by_site``, the request and the record hold the lock of each
        UID of the batch (sorted order): a round checks before it rebuilds, but two sites'
        batches of one UID checked at the same moment would both have found it free."""
        refused: set[str] = set()
        reasons: dict[str, str] = {}
        with contextlib.ExitStack() as locks:
            for uid in sorted({i.sop_instance_uid for i in batch}):
                locks.enter_context(self._uid_locks(uid))
            taken = store.archived_by_other_sites(
                self.hub.db, site, {i.sop_instance_uid: i.sha256 for i in batch})
            batch = [i for i in batch if i.sop_instance_uid not in taken]
            if batch:
                try:
                    self.hub.archive.store(batch, site=site)
                except ArchiveRefused as exc:
                    refused, reasons = set(exc.refused), exc.reasons
            accepted = [i for i in batch if i.sop_instance_uid not in refused]
            store.record_archived(self.hub.db, transfer_id, site,
                                  [(i.sop_instance_uid, i.sha256) for i in accepted])
        for instance in accepted:
            instance.path.unlink(missing_ok=True)
        return {**{i.sop_instance_uid: reasons.get(i.sop_instance_uid, "") for i in batch
                   if i.sop_instance_uid in refused}, **dict.fromkeys(taken, ANOTHER_SITE)}

    def _leave_another_site(self, row: Any, state: _Transfer,
                            taken: dict[str, tuple[str, str]]) -> None:
        """A background round leaves the instances whose UID another site archived with
        other bytes (the commit refuses them); said once per transfer, naming the site for
        regional ops (the site that sent them is never told another hospital's name)."""
        state.another_site |= set(taken)
        if state.another_site_said:
            log.debug("transfer %s: %s more not archived ahead (another site's UIDs)",
                      row["id"], counted(len(taken), "instance"))
            return
        state.another_site_said = True
        log.warning("site %s: transfer %s: %s not archived ahead: another site archived %s "
                    "with other bytes: %s (said once for this transfer; its commit will be "
                    "refused 422 another_site)", row["site"], row["id"],
                    counted(len(taken), "instance"),
                    "its SOP Instance UID" if len(taken) == 1 else "their SOP Instance UIDs",
                    _named(taken), extra={"SITE": row["site"]})


def _superseded(hub: Hub, row: Any, pending: dict[str, Any]) -> list[dict[str, str]]:
    """The instances of ``pending`` (not archived yet by this transfer) whose UID a receipt
    of a later transfer of the same site and study names with other bytes: the site replaced
    them (a correction) after this transfer began, so this transfer was left (the appliance
    sends a study's transfers one after the other). Archived now, each would make the
    stale version the region's current one again (the embedded archive makes an older
    version sent again current; an overwriting DICOMweb archive takes it over the newer)."""
    newer = store.receipted_since(hub.db, row["site"], row["study_uid"],
                                  float(row["created_at"]), row["id"])
    return [{"sop_instance_uid": uid, "sha256": i["sha256"],
             "current_sha256": newer[uid][0], "transfer_id": newer[uid][1]}
            for uid, i in pending.items() if uid in newer and newer[uid][0] != i["sha256"]]


def _named(taken: dict[str, tuple[str, str]], limit: int = 5) -> str:
    """'UID (site SITE)', the first ``limit`` by UID: for the hub's log only."""
    uids = sorted(taken)
    named = ", ".join(f"{uid} (site {taken[uid][0]})" if taken[uid][0] else uid
                      for uid in uids[:limit])
    return named + (f" and {len(uids) - limit} more" if len(uids) > limit else "")


def _another_site(row: Any, taken: dict[str, tuple[str, str]],
                  expected: dict[str, Any]) -> CommitRefused:
    """The commit's refusal of the instances whose UID another site archived with other
    bytes (``taken``: UID -> (that site, its SHA-256), the site "" when not known here),
    logged naming that site for regional ops; the answer names the UIDs only: telling a
    hospital which other hospital holds an instance would tell it who treats that patient."""
    count = len(taken)
    log.warning("site %s: transfer %s: commit refused, %s not archived: another site "
                "archived %s with other bytes: %s", row["site"], row["id"],
                counted(count, "instance"),
                "its SOP Instance UID" if count == 1 else "their SOP Instance UIDs",
                _named(taken), extra={"SITE": row["site"]})
    uids = sorted(taken)
    return CommitRefused(
        422, "another_site",
        f"{counted(count, 'instance')} of this transfer {'is' if count == 1 else 'are'} not "
        f"archived: another site already archived {'its' if count == 1 else 'their'} SOP "
        "Instance UID" + ("" if count == 1 else "s") + " with other bytes, and the region "
        "keeps that site's version (a study imported with its UIDs kept and its contents "
        "changed, or a modality reusing UIDs); nothing more of this transfer is archived, "
        "regional ops see which site in the hub's log: " + ", ".join(uids[:5])
        + (f" and {count - 5} more" if count > 5 else ""),
        another_site=[{"sop_instance_uid": uid, "sha256": expected[uid]["sha256"]}
                      for uid in uids])


def _check(ready: list[str], expected: dict[str, Any], numbers: dict[str, int],
           work: Path) -> tuple[list[RebuiltInstance], list[dict[str, Any]]]:
    """Size and SHA-256 of each rebuilt file against the manifest."""
    good, mismatch = [], []
    for uid in ready:
        instance = expected[uid]
        path = work / f"{numbers[uid]:06d}.dcm"
        actual = _sha256(path) if path.exists() else "absent"
        size = path.stat().st_size if path.exists() else 0
        if actual != instance["sha256"] or size != instance["size"]:
            mismatch.append({"sop_instance_uid": uid, "expected": instance["sha256"],
                             "actual": actual, "expected_size": instance["size"],
                             "actual_size": size})
        else:
            good.append(RebuiltInstance(uid, path, size, actual))
    return good, mismatch


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
