"""Dispatch: workers that take jobs from the durable queue and deliver them.

Owns: the worker loop (claim, lease renewal, success, retry with backoff, failure) and the
destination kinds behind one small interface in ``target_types/``. May not touch: the index
beyond what ``appliance.store.jobs`` offers, or routing decisions.
"""
