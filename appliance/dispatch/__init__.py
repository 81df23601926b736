"""Dispatch: workers that take jobs from the durable queue and deliver them.

Owns: the worker loop (claim, lease renewal, success, retry with backoff, failure) and the
destination kinds behind one small interface in ``target_types/``. May not touch: the index
other than through ``appliance.store`` (the queue in ``store.jobs``; what the workers also
read and write there: the files still missing in ``store.cache``, a destination's link
state in ``store.uplink``, a transcoded copy in ``store.transcode``), or routing decisions.
"""
