"""The regional hub: fleet PKI (pki.py), settings (config.py), the HTTPS service (app.py,
tls.py), the transfer API (transfers.py), rebuilding and archiving committed studies
(commit.py, archive.py), the fleet view (fleet.py, the operations engineer's), and the
home's backup and checked restore (backup.py, restore.py: whole files copied with their
modes, as ``appliance.ops.backup_folder`` and ``appliance.ops.restore`` do the appliance's).

May not touch: SQL (it lives in ``appliance.store.hub``; the embedded archive keeps its
index and spool through ``appliance.store``, as an appliance does), durable file writes
other than backup.py's and restore.py's whole-file copies (the transfers' spool is
``appliance.store.hub``'s), the appliance's own database or spool.
"""
