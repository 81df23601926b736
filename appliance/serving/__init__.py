"""Serving local viewers from the cache: C-FIND / C-MOVE / C-GET, DICOMweb, fetch-through.

Owns: the Query/Retrieve SCP handlers registered on the ingest AE (``qr.py``: C-FIND;
``qr_retrieve.py``: C-MOVE and C-GET, their sub-associations in ``qr_associations.py``;
identifiers read and C-FIND answers built in ``qr_identifiers.py``, a retrieve's C-STORE
sub-operations sent and their outcomes counted in ``suboperations.py``), the DICOMweb routes
(QIDO-RS, WADO-RS, STOW-RS) built over any (Database, Spool) pair (``dicomweb.py``; request
parsing and response bodies in ``dicomweb_http.py``), their authentication, the access audit
of every query and retrieve, and fetching studies that are not (fully) on site from the region
through the hub (``fetch.py``).

May not touch: SQL (that lives in ``appliance/store/query.py``, ``retrieve.py`` and the other
store modules), spool writes (new instances go through ``appliance.ingest.receive.Receiver``),
the uplink.
"""
