"""Transfer to the regional hub: packing (pack.py, with unpack.py for the hub's side,
layout.py to find pixel data, jls.py for CharLS, levels.py for the auto level), sealing
(seal.py), the incremental multipart reader (multipart.py, the hub's and the ``stowrs``
destination's), the HTTP client (client.py; reservations.py when the hub is busy), and the
enrolment files (enrolment.py). May not touch: SQL (that lives in ``appliance.store``)."""
