"""Priors on site before the patient arrives.

Owns: the HL7 v2 MLLP listener (``listener``), reading RIS messages and answering them
(``messages``), the prefetch rules and WAN windows (``rules``), the scheduler that claims the
requests (``service``) and the work of each, priors fetched from the region into the cache
(``fetcher``). May not touch: SQL (that is ``appliance.store.prefetch``) or spool files (the
ingest ``Receiver`` writes them).
"""
