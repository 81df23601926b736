"""What the DICOM listener accepts: calling AEs (and their hosts), storage SOP classes and
transfer syntaxes, and the journal lines for the presentation contexts it refuses (a SOP class
it does not take, or none of a context's transfer syntaxes one it reads).

Owns: the lists and the association policy's decision. May not touch: sockets, SQL or files
(appliance/ingest/scp.py applies these decisions to pynetdicom's events).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Iterable, Sequence

from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import register_uid
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class  # type: ignore[attr-defined]

from appliance.config import DicomSection
from appliance.config_types import _storage_sop_class_uid
from appliance.words import counted

log = logging.getLogger("pas.ingest")

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
UNCOMPRESSED = [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN]
# The compressed transfer syntaxes that are lossless by definition (PS3.5 8.2).
LOSSLESS_COMPRESSED = [
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.70",   # JPEG Lossless, First-Order Prediction (Selection Value 1)
    "1.2.840.10008.1.2.4.57",   # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 with RPCL Options (Lossless Only)
    "1.2.840.10008.1.2.5",      # RLE Lossless
    "1.2.840.10008.1.2.4.92",   # JPEG 2000 Part 2 Multi-component (Lossless Only)
]

# The order in which the listener takes a presentation context's transfer syntaxes: every one
# pydicom knows (the bytes are stored as they arrive, never transcoded), the first of this list
# that the context proposes winning (pynetdicom's acceptor walks ITS list, not the
# requestor's). A context proposes several when the sender can convert: DCMTK's dcmsend
# proposes one context [JPEG-LS Lossless, Explicit LE, Explicit BE, Implicit LE] for a JPEG-LS
# file, and a modality holding compressed images does the like. With the uncompressed
# syntaxes first, PAS made such a sender decompress: a lossless CT arrived and was stored as
# 3.2 times the bytes, not the modality's own encoding. So:
# 1. the lossless compressed syntaxes: the sender's own encoding, kept, and nothing lost;
# 2. Explicit, then Implicit VR Little Endian: before anything below, so that a sender holding
#    uncompressed pixels that offers to compress them is never led to a lossy syntax (JPEG
#    Baseline, JPEG 2000, JPEG-LS near-lossless, HTJ2K, the video ones: after these), and
#    Deflated (which pynetdicom's own default contexts propose) costs no sender a deflate;
# 3. everything else pydicom knows, in pydicom's order (Deflated, Explicit VR Big Endian, the
#    lossy and possibly lossy ones): taken only when a context offers nothing above.
# A sender holding lossy pixels that also proposes an uncompressed syntax sends them
# decompressed (bigger, no further loss); one proposing its lossy syntax alone is taken as is.
TRANSFER_SYNTAXES = LOSSLESS_COMPRESSED + UNCOMPRESSED + [
    str(t) for t in AllTransferSyntaxes if str(t) not in LOSSLESS_COMPRESSED + UNCOMPRESSED]
# The order for a context PAS sends on: a C-GET viewer's storage contexts (the viewer in the
# SCP role, appliance/ingest/scp.py). Uncompressed first, as before: PAS can make any instance
# it holds uncompressed for the viewer (serving/qr_retrieve.py), while a compressed syntax
# taken there would carry only the instances stored in it.
SENDING_TRANSFER_SYNTAXES = UNCOMPRESSED + [
    str(t) for t in AllTransferSyntaxes if str(t) not in UNCOMPRESSED]

# Retired image storage SOP classes (PS3.4 2004 and before) that modalities still in service
# send: ultrasound carts and gamma cameras keep their original SOP Class. pynetdicom does not
# know them, so their presentation contexts were rejected (abstract syntax not supported)
# and such a modality could not send at all; DCMTK's storescp and Orthanc accept them.
# Registered with pynetdicom as storage classes, they are received, filed and served
# (C-GET) like any other. The keywords are pydicom's.
RETIRED_IMAGE_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.3": "UltrasoundMultiFrameImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.5": "NuclearMedicineImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.6": "UltrasoundImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.12.3": "XRayAngiographicBiPlaneImageStorage",
    "1.2.840.10008.5.1.4.1.1.77.1": "VLImageStorageTrial",
    "1.2.840.10008.5.1.4.1.1.77.2": "VLMultiFrameImageStorageTrial",
}


def storage_sop_classes(extra: Sequence[str] = ()) -> list[str]:
    """Every storage SOP class PAS accepts and serves: pynetdicom's, the retired image
    classes, then ``extra`` (``dicom.extra_storage_sop_classes``: vendors' private classes
    such as Siemens CSA Non-Image). The ones pynetdicom does not know are registered with it
    here as storage classes, once per process, so that its C-STORE handling, the direct
    path (both ask ``uid_to_service_class``), C-GET and C-MOVE sub-operations take them as
    storage: received, filed and served like any other."""
    for uid, keyword in RETIRED_IMAGE_STORAGE.items():
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, keyword, StorageServiceClass)
    known = [str(context.abstract_syntax) for context in AllStoragePresentationContexts]
    classes = known + [uid for uid in RETIRED_IMAGE_STORAGE if uid not in known]
    for uid in extra:
        if uid_to_service_class(uid) is not StorageServiceClass:
            # The keyword only has to be a unique Python identifier (pynetdicom's rule).
            register_uid(uid, "PasExtraStorage_" + uid.replace(".", "_"), StorageServiceClass)
        if uid not in classes:
            classes.append(uid)
    return classes


class _SaidOncePer:
    """A journal line said at most once per ``every_s`` for one key, with how many times it
    was due meanwhile. Bounded memory (invariant 8: with dicom.accept_unknown any calling AE
    may propose any UID): at most ``MAX_REMEMBERED`` keys; past it, the ones said longer than
    ``every_s`` ago go."""

    MAX_REMEMBERED = 4096

    def __init__(self, every_s: float = 3600.0):
        self.every_s = every_s
        self._last: dict[tuple[str, object], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def _due(self, key: tuple[str, object]) -> int | None:
        """None when ``key`` was said within ``every_s`` (counted); else how many times it
        was due since it was last said (0 the first time), and it is said now."""
        now = time.monotonic()
        with self._lock:
            if len(self._last) >= self.MAX_REMEMBERED:
                self._last = {k: value for k, value in self._last.items()
                              if now - value[0] < self.every_s}
                if len(self._last) >= self.MAX_REMEMBERED:
                    self._last.clear()  # a flood: saying a line again is the lesser harm
            said_at, since = self._last.get(key, (-self.every_s, 0))
            if now - said_at < self.every_s:
                self._last[key] = (said_at, since + 1)
                return None
            self._last[key] = (now, 0)
            return since

    @staticmethod
    def _again(since: int) -> str:
        return f"; refused {counted(since, 'more time')} since it was last said" if since else ""


def _named(uid: str) -> str:
    """``Name (uid)`` for a UID pydicom names, else the UID (at most 64 characters of it: a
    UID item of a PDU may be 65,535 bytes long)."""
    name = UID(uid).name
    shown = uid if len(uid) <= 64 else uid[:64] + "..."
    return shown if name == uid else f"{name} ({uid})"


# Where a modality's non-storage services belong, for the refusal line of a standard SOP class
# PAS does not provide: (a UID, or a UID prefix ending in a dot; what the modality's settings
# call the service; who provides it).
_ELSEWHERE = [
    ("1.2.840.10008.3.1.2.3.3", "MPPS", "the RIS"),   # Modality Performed Procedure Step
    ("1.2.840.10008.3.1.2.3.4", "MPPS", "the RIS"),   # its Retrieve and Notification (retired)
    ("1.2.840.10008.3.1.2.3.5", "MPPS", "the RIS"),
    ("1.2.840.10008.5.1.4.31", "worklist", "the RIS"),     # Modality Worklist FIND
    ("1.2.840.10008.5.1.4.32.", "worklist", "the RIS"),    # General Purpose Worklist (retired)
    ("1.2.840.10008.5.1.4.34.6.", "Unified Procedure Step", "the RIS"),
    ("1.2.840.10008.5.1.1.", "printing", "the film printer"),  # Print Management
]


def standard_non_storage(uid: str) -> bool:
    """Whether ``uid`` is a standard UID pydicom names that is no storage SOP class (MPPS,
    worklist, print...): ``dicom.extra_storage_sop_classes`` would refuse it."""
    if UID(uid).name == uid:  # private or unknown: may be a vendor's storage class
        return False
    try:
        _storage_sop_class_uid(uid)
    except ValueError:
        return True
    return False


class RefusedSopClassLog(_SaidOncePer):
    """The journal line for a presentation context refused because PAS does not take its
    SOP class: which class, from whom, and what to do: the key that would accept a private
    (or unknown) class, or, for a standard service PAS does not provide (MPPS, worklist,
    print, Storage Commitment when ``dicom.storage_commitment`` is off), where the modality's
    service belongs (``dicom.extra_storage_sop_classes`` takes storage classes only: ``pas
    config check`` refuses a standard UID of anything else).

    pynetdicom rejects such a context silently (abstract syntax not supported, PS3.8
    9.3.3.2), the modality logs a failure for every object of that class, and the study
    reaches the region incomplete: the only trace on PAS's side is this line. Said at most
    once per ``every_s`` for one calling AE and SOP class (a modality opening one
    association per image would otherwise write it for every image), with how many times it
    was refused meanwhile."""

    def __init__(self, every_s: float = 3600.0, storage_commitment: bool = True):
        super().__init__(every_s)
        self.storage_commitment = storage_commitment  # dicom.storage_commitment

    def refused(self, calling: str, address: str, sop_classes: set[str]) -> None:
        for uid in sorted(sop_classes):
            since = self._due((calling, uid))
            if since is None:
                continue
            log.warning("presentation context for SOP class %s from %s (%s) refused: %s%s",
                        _named(uid), calling, address, self.advice(uid), self._again(since),
                        extra={"CALLING_AE": calling})

    def advice(self, uid: str) -> str:
        """Why PAS refused ``uid``, and what to do."""
        if standard_non_storage(uid):  # the key would not take it
            return self._not_provided(uid, UID(uid).name)
        return (f"not a storage SOP class PAS takes; to accept it, add \"{uid}\" to "
                "dicom.extra_storage_sop_classes")

    def _not_provided(self, uid: str, name: str) -> str:
        kind = UID(uid).type
        if kind not in ("SOP Class", "Meta SOP Class"):
            return (f"it is the UID of a {kind.lower() or 'non-SOP-class item'}, not of a SOP "
                    "class: the modality's configuration names the wrong UID")
        service = name.removesuffix(" SOP Class")
        if uid == STORAGE_COMMITMENT_PUSH and not self.storage_commitment:
            return (f"PAS does not provide {service} here: dicom.storage_commitment is off "
                    "(turn it on for PAS to answer the modality's commitment requests, or "
                    "turn the modality's storage commitment to PAS off)")
        for prefix, what, where in _ELSEWHERE:
            if uid == prefix or (prefix.endswith(".") and uid.startswith(prefix)):
                return (f"PAS does not provide {service}: point the modality's {what} at "
                        f"{where} (or the system that provides it)")
        return (f"PAS does not provide {service}: point the modality's {service} at the "
                "system that provides it")


class RefusedTransferSyntaxLog(_SaidOncePer):
    """The journal line for a presentation context refused because none of its transfer
    syntaxes is one PAS reads (transfer syntaxes not supported, PS3.8 9.3.3.2: JPEG XL, which
    pydicom 3.0 does not know, a private syntax): which SOP class, the syntaxes proposed,
    from whom, and what to do. Without it such a refusal left no trace on PAS's side.

    Said like :class:`RefusedSopClassLog`'s: at most once per ``every_s`` for one calling
    AE, SOP class and set of proposed syntaxes, with how many times it was refused
    meanwhile. The key keeps a digest of the class and syntaxes, not the UIDs themselves:
    a context may propose many, each up to 65,535 bytes long in the PDU."""

    SHOWN = 8  # syntaxes named in the line; the rest counted

    def refused(self, calling: str, address: str,
                contexts: Iterable[tuple[str, Sequence[str]]]) -> None:
        """``contexts``: (SOP Class UID, the transfer syntaxes proposed for it), one per
        refused context."""
        said: set[bytes] = set()
        for uid, syntaxes in contexts:
            digest = hashlib.sha256("\0".join([uid, *sorted(set(syntaxes))]).encode(
                "utf-8", "replace")).digest()
            if digest in said:  # the same proposal in two contexts of one association
                continue
            said.add(digest)
            since = self._due((calling, digest))
            if since is None:
                continue
            shown = ", ".join(_named(s) for s in syntaxes[:self.SHOWN])
            if len(syntaxes) > self.SHOWN:
                shown += f" and {len(syntaxes) - self.SHOWN} more"
            log.warning("presentation context for SOP class %s from %s (%s) refused: PAS reads "
                        "none of the transfer syntaxes proposed (%s); the modality must also "
                        "propose one PAS reads, e.g. Explicit VR Little Endian%s",
                        _named(uid), calling, address, shown or "none", self._again(since),
                        extra={"CALLING_AE": calling})


# ``pas doctor``'s calling AE title. Its C-ECHO from this machine is let through, Verification
# only: refused as an unknown AE (the appliance's default), every check-up wrote a security
# warning, a failure row in the audit trail (and in the ATNA collector's copy) and a count of
# pas_access_refused_total{reason="unknown-ae"}: a false event each time IT ran doctor.
DOCTOR_AE = "PASDOCTOR"


def _peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An association's address as an IP (None: not one), an IPv4 peer seen by an IPv6
    listener (``::ffff:127.0.0.1``) as the IPv4 address it is, a scope (``%eth0``) left
    out."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


def _same_address(pin: str, address: str) -> bool:
    pinned, came = _peer_ip(pin), _peer_ip(address)
    return pin == address if pinned is None or came is None else pinned == came


def _loopback(address: str) -> bool:
    ip = _peer_ip(address)
    return ip is not None and ip.is_loopback


class AssociationPolicy:
    """Which calling AEs may open an association, and from where."""

    def __init__(self, config: DicomSection):
        self.accept_unknown = config.accept_unknown
        self.known = {ae.title: ae.host for ae in config.known_aes}

    def pinned_to(self, calling_ae: str, address: str) -> bool:
        """Whether ``calling_ae`` is pinned to ``address``, the address the association
        came from: compared as addresses (a listener on ``::`` sees an IPv4 modality as
        ``::ffff:10.1.2.3``), not as strings."""
        host = self.known.get(calling_ae)
        return host is not None and _same_address(host, address)

    def refusal(self, calling_ae: str, address: str,
                proposed: Sequence[str] = ()) -> str | None:
        """None when allowed; otherwise the reason, for the log. ``proposed``: the abstract
        syntaxes of the request's presentation contexts (:data:`DOCTOR_AE`'s exception)."""
        if calling_ae in self.known:
            host = self.known[calling_ae]
            if host is not None and not self.pinned_to(calling_ae, address):
                return (f"calling AE {calling_ae!r} is pinned to {host} (its dicom.known_aes "
                        f"entry's host) but connected from {address}")
            return None
        if self.accept_unknown:
            return None
        if calling_ae == DOCTOR_AE and _loopback(address) and proposed \
                and all(uid == VERIFICATION for uid in proposed):
            return None
        return f"calling AE {calling_ae!r} from {address} is not a known AE (dicom.known_aes)"
