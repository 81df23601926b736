"""Experiment only (bench/ingest_processes.py): pynetdicom's listener with SO_REUSEPORT, so
that several ``pas run`` processes share one DICOM port and the kernel spreads the
connections. Loaded by Python at start-up when this folder is on PYTHONPATH, active only with
``PAS_BENCH_REUSEPORT=1``; never part of the appliance."""

import os
import socket

if os.environ.get("PAS_BENCH_REUSEPORT"):
    import pynetdicom.transport as _transport

    _bind = _transport.AssociationServer.server_bind

    def _server_bind(self) -> None:  # type: ignore[no-untyped-def]
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _bind(self)

    _transport.AssociationServer.server_bind = _server_bind
