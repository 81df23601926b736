"""DICOM networking shared by ingest and serving: how pynetdicom's association threads wait.

Owns: process-wide adjustments to pynetdicom (see ``reactor``; ``idle``: what its network
timeout measures; ``nodelay``: Nagle off on every association's socket; ``poll``: a socket's
readiness asked with poll(2), for descriptors past 1024). May not touch the
index, the spool or any service's handlers."""


def install(event_driven: bool = True) -> None:
    """Every process that makes associations (the daemon, ``pas send``, ``pas doctor``) calls
    this before its first one: presentation contexts copied cheaply, and, unless
    ``dicom.event_driven = false``, the event-driven loops. Those also close pynetdicom's own
    race in which its association loop takes a C-STORE-RSP meant for ``send_c_store`` (the
    sender then waits out the DIMSE timeout and aborts: seen once in CI with ``pas send``,
    a 30 s stall and "no answer" after 6 of 10 files)."""
    from appliance.dicomnet import contexts, nodelay, poll, reactor, unaccepted

    contexts.install()
    poll.install()  # select() refuses descriptors past 1024: the association was aborted
    nodelay.install()  # TCP_NODELAY on every association's socket (no 40 ms stalls)
    unaccepted.install()  # a message on a context not accepted: named, A-P-ABORT
    if event_driven:
        reactor.install()
