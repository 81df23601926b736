"""What the DICOM listener accepts: calling AEs (and their hosts), storage SOP classes and
transfer syntaxes, and the journal line for a SOP class it refuses.

Owns: the lists and the association policy's decision. May not touch: sockets, SQL or files
(appliance/ingest/scp.py applies these decisions to pynetdicom's events).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Sequence

from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import register_uid
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class  # type: ignore[attr-defined]

from appliance.config import DicomSection
from appliance.words import counted

log = logging.getLogger("pas.ingest")

VERIFICATION = "1.2.840.10008.1.1"

# Every transfer syntax pydicom knows: we store what arrives as it arrives. Uncompressed first.
_PREFERRED = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",    # Implicit VR Little Endian
]
TRANSFER_SYNTAXES = _PREFERRED + [str(t) for t in AllTransferSyntaxes if str(t) not in _PREFERRED]

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



class RefusedSopClassLog:
    """The journal line for a presentation context refused because PAS does not take its
    SOP class: which class, from whom, and the key that would accept it.

    pynetdicom rejects such a context silently (abstract syntax not supported, PS3.8
    9.3.3.2), the modality logs a failure for every object of that class, and the study
    reaches the region incomplete: the only trace on PAS's side is this line. Said at most
    once per ``every_s`` for one calling AE and SOP class (a modality opening one
    association per image would otherwise write it for every image), with how many times it
    was refused meanwhile."""

    # Pairs remembered at most (bounded memory, invariant 8: with dicom.accept_unknown any
    # calling AE may propose any UID); past it, the ones said longer than every_s ago go.
    MAX_REMEMBERED = 4096

    def __init__(self, every_s: float = 3600.0):
        self.every_s = every_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def refused(self, calling: str, address: str, sop_classes: set[str]) -> None:
        now = time.monotonic()
        for uid in sorted(sop_classes):
            with self._lock:
                if len(self._last) >= self.MAX_REMEMBERED:
                    self._last = {key: value for key, value in self._last.items()
                                  if now - value[0] < self.every_s}
                    if len(self._last) >= self.MAX_REMEMBERED:
                        self._last.clear()  # a flood: saying a line again is the lesser harm
                said_at, since = self._last.get((calling, uid), (-self.every_s, 0))
                if now - said_at < self.every_s:
                    self._last[(calling, uid)] = (said_at, since + 1)
                    continue
                self._last[(calling, uid)] = (now, 0)
            name = UID(uid).name
            what = uid if name == uid else f"{name} ({uid})"
            again = f"; refused {counted(since, 'more time')} since it was last said" \
                if since else ""
            log.warning("presentation context for SOP class %s from %s (%s) refused: not a "
                        "storage SOP class PAS takes; to accept it, add \"%s\" to "
                        "dicom.extra_storage_sop_classes%s", what, calling, address, uid, again,
                        extra={"CALLING_AE": calling})


# ``pas doctor``'s calling AE title. Its C-ECHO from this machine is let through, Verification
# only: refused as an unknown AE (the appliance's default), every check-up wrote a security
# warning, a failure row in the audit trail (and in the ATNA collector's copy) and a count of
# pas_access_refused_total{reason="unknown-ae"}: a false event each time IT ran doctor.
DOCTOR_AE = "PASDOCTOR"


def _loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 listener's view
    return (mapped or ip).is_loopback


class AssociationPolicy:
    """Which calling AEs may open an association, and from where."""

    def __init__(self, config: DicomSection):
        self.accept_unknown = config.accept_unknown
        self.known = {ae.title: ae.host for ae in config.known_aes}

    def refusal(self, calling_ae: str, address: str,
                proposed: Sequence[str] = ()) -> str | None:
        """None when allowed; otherwise the reason, for the log. ``proposed``: the abstract
        syntaxes of the request's presentation contexts (:data:`DOCTOR_AE`'s exception)."""
        if calling_ae in self.known:
            host = self.known[calling_ae]
            if host is not None and host != address:
                return f"calling AE {calling_ae!r} is known, but from {host}, not {address}"
            return None
        if self.accept_unknown:
            return None
        if calling_ae == DOCTOR_AE and _loopback(address) and proposed \
                and all(uid == VERIFICATION for uid in proposed):
            return None
        return f"calling AE {calling_ae!r} from {address} is not a known AE (dicom.known_aes)"
