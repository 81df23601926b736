"""Destination kind ``dicom``: C-STORE to a DICOM node on the LAN (the hospital's own PACS).

One association per job (a study or its delta). Each SOP class is proposed in its stored
transfer syntax and, separately, uncompressed; a stored file goes byte for byte when its
syntax was accepted, and is decompressed to explicit VR little endian only when the peer
refused it. The files are streamed from disk, never loaded whole, when sent as stored.
"""

from __future__ import annotations

import logging

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context

from appliance.config import DicomDestination
from appliance.dispatch.target_types.base import PermanentError, SendContext
from appliance.store.jobs import Job

log = logging.getLogger("pas.dispatch.dicom")

# Send files' datasets exactly as stored, streamed from disk, instead of decoding them.
_config.STORE_SEND_CHUNKED_DATASET = True

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts in one association
BATCH_MARK = 25     # record progress every N instances


class DicomTarget:
    kind = "dicom"

    def __init__(self, name: str, config: DicomDestination, local_ae_title: str):
        self.name = name
        self.config = config
        self.calling_ae = config.calling_ae_title or local_ae_title

    def send(self, job: Job, context: SendContext) -> None:
        files = context.files(job)
        if not files:
            return
        pairs = sorted({(f["sop_class_uid"], f["transfer_syntax_uid"]) for f in files})
        contexts = []
        for sop_class, syntax in pairs:
            contexts.append(build_context(sop_class, [syntax]))
            if syntax not in UNCOMPRESSED:
                contexts.append(build_context(sop_class, UNCOMPRESSED))
        if len(contexts) > MAX_CONTEXTS:
            raise PermanentError(f"study needs {len(contexts)} presentation contexts (max 128)")
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.config.timeout_s
        tls_args = None
        if self.config.tls and self.config.tls_ca:  # DICOM TLS, BCP 195 (ops/security.py)
            from appliance.ops.security import client_context

            tls_args = (client_context(self.config.tls_ca, self.config.tls_cert,
                                       self.config.tls_key), None)
        assoc = ae.associate(self.config.host, self.config.port, contexts,
                             ae_title=self.config.ae_title, tls_args=tls_args)  # type: ignore[arg-type]
        if not assoc.is_established:
            raise ConnectionError(
                f"{self.name}: association with {self.config.ae_title}@{self.config.host}:"
                f"{self.config.port} not established (rejected or unreachable)"
            )
        sent: list[int] = []
        try:
            accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0]))
                        for c in assoc.accepted_contexts}
            for row in files:
                self._send_one(assoc, row, accepted, context)
                sent.append(row["id"])
                if len(sent) >= BATCH_MARK:
                    context.mark_sent(job, sent)
                    context.keep_alive(job)
                    sent = []
        finally:
            if sent:
                context.mark_sent(job, sent)
            if assoc.is_established:
                assoc.release()

    def _send_one(self, assoc, row, accepted, context: SendContext) -> None:  # type: ignore[no-untyped-def]
        path = context.spool.path(row["path"])
        sop_class, syntax = row["sop_class_uid"], row["transfer_syntax_uid"]
        if (sop_class, syntax) in accepted:
            status = assoc.send_c_store(path)
        elif any((sop_class, str(ts)) in accepted for ts in UNCOMPRESSED):
            dataset = dcmread(path)
            if UID(syntax).is_compressed:
                dataset.decompress()
            status = assoc.send_c_store(dataset)
        else:
            raise PermanentError(
                f"{self.name} accepted no transfer syntax for SOP class {sop_class}"
            )
        if status is None or "Status" not in status:
            raise ConnectionError(f"{self.name}: no C-STORE response for {row['sop_instance_uid']}")
        code = int(status.Status)
        if code not in (0x0000, 0xB000, 0xB007, 0xB006):
            raise ConnectionError(
                f"{self.name} answered C-STORE status 0x{code:04X} for {row['sop_instance_uid']}"
            )
