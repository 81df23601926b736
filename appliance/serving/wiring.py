"""How serving plugs into the daemon: Q/R handlers on the ingest AE, DICOMweb routes.

Owns: the one call the daemon makes (:func:`wire_serving`). Kept here so that the daemon
stays a list of start-up steps. May not touch: SQL, spool writes.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Any

from pynetdicom import _config

from appliance.serving.fetch import make_fetcher, make_region_find
from appliance.serving.qr import QueryRetrieveService

if TYPE_CHECKING:
    from appliance.config import Settings
    from appliance.daemon import Daemon

log = logging.getLogger("pas.serving")


def wire_serving(daemon: Daemon) -> None:
    """Register C-FIND/C-MOVE/C-GET before the listener starts; contribute /dicom-web."""
    settings = daemon.settings
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        # pynetdicom's "standard" handlers format a log line for every PDU and DIMSE message
        # even when INFO is off; on a retrieve of 500 small instances that is measurable.
        _config.LOG_HANDLER_LEVEL = "none"
        # Its C-FIND SCP also decodes and formats every request identifier, and formats
        # every answer's (pretty_dataset, ~0.15 ms a match), then logs them at INFO/DEBUG.
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
    fetcher = make_fetcher(settings, daemon.db, daemon.receiver)
    daemon.qr = QueryRetrieveService(settings.serving, daemon.db, daemon.spool,
                                     settings.dicom.ae_title, fetcher=fetcher,
                                     region_find=make_region_find(settings),
                                     tls=settings.dicom.tls)
    daemon.qr.register(daemon.listener)
    from appliance.serving.dicomweb import daemon_routes

    daemon.route_providers.append(daemon_routes)


def web_tls(settings: Settings) -> dict[str, Any]:
    """uvicorn TLS options when ``serving.tls_cert`` and ``tls_key`` are set: the whole port
    speaks TLS; with ``serving.auth = "client_cert"`` it also refuses, in the handshake, a
    client without a certificate from ``tls_client_ca``. Empty otherwise (plain HTTP). Also with
    ``serving.enabled = false``: the status page, /metrics and /api/status stay protected.

    The DICOM port's BCP 195 profile (appliance/ops/security.py) holds here too: uvicorn's
    own cipher list ("TLSv1") let a TLS 1.2 client agree on a CBC suite without AEAD
    (ECDHE-ECDSA-AES256-SHA384) for DICOMweb's images; the AEAD suites of that list need
    TLS 1.2, so TLS 1.0 and 1.1 find none either. The key must be 0600 as ``dicom.tls.key``
    (:class:`~appliance.ops.security.SecretFileError` naming the file and the fix): it was
    used whatever its mode."""
    from appliance.ops.security import BCP195_TLS12_CIPHERS, check_secret_file

    serving = settings.serving
    if serving.tls_cert is None or serving.tls_key is None:
        return {}  # plain HTTP (the section's check: both with client_cert)
    check_secret_file(serving.tls_key, "serving.tls_key")
    options: dict[str, Any] = {"ssl_certfile": str(serving.tls_cert),
                               "ssl_keyfile": str(serving.tls_key),
                               "ssl_ciphers": BCP195_TLS12_CIPHERS}
    if serving.auth == "client_cert":
        options |= {"ssl_ca_certs": str(serving.tls_client_ca),
                    "ssl_cert_reqs": ssl.CERT_REQUIRED}
    # With bearer (or none): TLS, no client certificate. It stayed plain HTTP whatever
    # tls_cert said, and bearer tokens and images crossed the hospital network in clear
    # while the administrator who set tls_cert believed the port encrypted.
    return options
