"""DICOM networking shared by ingest and serving: how pynetdicom's association threads wait.

Owns: process-wide adjustments to pynetdicom (see ``reactor``). May not touch the index, the
spool or any service's handlers."""
