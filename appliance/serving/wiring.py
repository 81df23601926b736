"""How serving plugs into the daemon: Q/R handlers on the ingest AE, DICOMweb routes.

Owns: the one call the daemon makes (:func:`wire_serving`). Kept here so that the daemon
stays a list of start-up steps. May not touch: SQL, spool writes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from appliance.serving.fetch import make_fetcher, make_region_find
from appliance.serving.qr import QueryRetrieveService

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger("pas.serving")


def wire_serving(daemon: Daemon) -> None:
    """Register C-FIND/C-MOVE/C-GET before the listener starts; contribute /dicom-web."""
    settings = daemon.settings
    fetcher = make_fetcher(settings, daemon.db, daemon.receiver)
    daemon.qr = QueryRetrieveService(settings.serving, daemon.db, daemon.spool,
                                     settings.dicom.ae_title, fetcher=fetcher,
                                     region_find=make_region_find(settings))
    daemon.qr.register(daemon.listener)
    from appliance.serving.dicomweb import daemon_routes

    daemon.route_providers.append(daemon_routes)
