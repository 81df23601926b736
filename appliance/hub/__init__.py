"""The regional hub: fleet PKI (pki.py), settings (config.py), the HTTPS service (app.py,
tls.py), the transfer API (transfers.py), rebuilding and archiving committed studies
(commit.py, archive.py), and the fleet view (fleet.py, the operations engineer's).

May not touch: SQL or durable file writes (those live in ``appliance.store.hub``), the
appliance's own database or spool.
"""
