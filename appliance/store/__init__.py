"""Storage: the SQLite database (index, jobs, audit) and the spool of received files.

The only package that writes SQL or files of received instances. Everything else calls its
plain functions (``index``, ``jobs``, ``audit``) and :class:`~appliance.store.spool.Spool`.
"""
