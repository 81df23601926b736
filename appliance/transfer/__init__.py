"""Transfer to the regional hub: packing (pack.py), sealing (seal.py), the HTTP client, and the
enrolment files (enrolment.py). May not touch: SQL (that lives in ``appliance.store``)."""
