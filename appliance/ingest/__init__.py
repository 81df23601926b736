"""Ingest: DICOM objects arriving from modalities (C-STORE) and, later, STOW-RS.

Owns: the association policy (which AEs may send), reading enough of each header to index
it, and the durable receive path: spool write, then index commit, then success. May not
touch: routing or transfer (they pick the instances up from the index afterwards); the one
import from there is ``routing.backoff``'s pure delay formula, which the Storage Commitment
reports' retries share with the job queue.
"""
