"""Staging a download: the archive's multipart answer into files, and files into buckets.

Owns: writing each instance of the archive's multipart answer to its own file while hashing
it (the parsing is :mod:`appliance.transfer.multipart`'s; memory holds one chunk, whatever the
size of an instance),
the instance's label (its SOP Instance UID from the file meta), and the planner that cuts the
staged instances into buckets as they arrive (``pack.plan_buckets``' cuts, emitted as soon as
known). Used by :mod:`appliance.hub.download_stages`, and by the ``dicomweb`` archive to hash
what it reads back (:mod:`appliance.hub.archive`). May not touch: SQL, the network, packing.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info

from appliance.transfer.multipart import StreamedParts
from appliance.transfer.pack import BucketPlan, PackItem


class ArchiveFailed(Exception):
    """The archive did not deliver the study; ``status`` is the answer to give."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class Planner:
    """``pack.plan_buckets`` one file at a time: the same cuts, emitted as soon as known."""

    def __init__(self, target: int, first: int | None = None, index: int = 0):
        self.target = target
        self.close_at = min(first or target, target)  # the first bucket's size, then target
        self.index = index
        self.entries: list[tuple[PackItem, int, int]] = []
        self.used = 0

    def add(self, item: PackItem) -> list[BucketPlan]:
        out: list[BucketPlan] = []
        if self.used + item.size > self.target and self.entries:
            out.append(self._close())
        offset = 0
        while item.size - offset > self.target:
            self.entries.append((item, offset, self.target))
            out.append(self._close())
            offset += self.target
        self.entries.append((item, offset, item.size - offset))
        self.used += item.size - offset
        if self.used >= self.close_at:
            out.append(self._close())
        return out

    def finish(self, last: int | None = None) -> list[BucketPlan]:
        """What is left, as one bucket, or (``last``) as buckets of about ``last`` bytes
        (whole pieces: none is cut further)."""
        if not self.entries:
            return []
        if last is None or self.used <= last:
            return [self._close()]
        out: list[BucketPlan] = []
        pending, self.entries, size = self.entries, [], 0
        for entry in pending:
            if size and size + entry[2] > last:
                out.append(self._close())
                size = 0
            self.entries.append(entry)
            size += entry[2]
        out.append(self._close())
        return out

    def _close(self) -> BucketPlan:
        plan = BucketPlan(self.index, self.entries)
        self.index += 1
        self.entries, self.used, self.close_at = [], 0, self.target
        return plan


class PartsToFiles(StreamedParts):
    """Writes each part of a ``multipart/related`` answer to its own file while hashing it
    (the parsing is :class:`appliance.transfer.multipart.MultipartReader`'s): memory holds one
    chunk, whatever the size of an instance."""

    def __init__(self, boundary: bytes, folder: Path, on_part: Callable[[Path, int, str], None]):
        self.folder = folder
        self.on_part = on_part
        super().__init__(boundary, _bad_answer)
        self.handle: Any = None
        self.path: Path | None = None
        self.digest: Any = None
        self.size = 0

    def part_started(self) -> None:
        self.path = self.folder / f"{uuid.uuid4().hex}.dcm"
        self.handle = open(self.path, "wb")
        self.digest, self.size = hashlib.sha256(), 0

    def part_data(self, data: bytes) -> None:
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)

    def part_ended(self) -> None:
        self.handle.close()
        assert self.path is not None
        self.on_part(self.path, self.size, self.digest.hexdigest())

    def close(self) -> None:
        if self.handle is not None and not self.handle.closed:
            self.handle.close()


def _bad_answer(message: str) -> ArchiveFailed:
    return ArchiveFailed(502, "archive_bad_answer", message)


def boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode()
    raise ArchiveFailed(502, "archive_bad_answer",
                        f"the archive answered {content_type!r}, not multipart with a boundary")


def uid_of(path: Path) -> str:
    """The instance's label in the stream: the file meta's Media Storage SOP Instance UID (the
    dataset's header parse cost 15 % of the hub's time on 520 small MR files), else the
    dataset's. Only a label: the site checks the bytes by SHA-256, its index reads the
    dataset."""
    try:
        meta = read_file_meta_info(path)
        uid = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    except Exception:  # no or damaged meta: the dataset says
        uid = ""
    if uid:
        return uid
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"], force=True)
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid:
        raise ArchiveFailed(502, "archive_bad_answer", "the archive sent an instance without "
                            "a SOP Instance UID")
    return uid
