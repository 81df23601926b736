"""Priors on site before the patient arrives.

Owns: the HL7 v2 MLLP listener (``listener``), reading RIS messages and answering them
(``messages``), the prefetch rules and WAN windows (``rules``) and the scheduler that fetches
priors from the region into the cache (``service``). May not touch: SQL (that is
``appliance.store.prefetch``) or spool files (the ingest ``Receiver`` writes them).
"""
