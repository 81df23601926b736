"""Destination kinds behind one small interface (``base.TargetType``).

``make_target`` builds the target for a destination name from the configuration; a new kind
is a module here plus one line in :data:`FACTORIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from appliance.config import DicomDestination, Settings
from appliance.dispatch.target_types.base import (
    NotConfigured,
    PermanentError,
    TargetType,
    TrustRefused,
)
from appliance.dispatch.target_types.dicom import DicomTarget
from appliance.dispatch.target_types.stowrs import StowRsTarget
from appliance.transfer.http import hub_proxy

FACTORIES: dict[str, Callable[[str, Any, Settings], TargetType]] = {
    "dicom": lambda name, cfg, settings: DicomTarget(name, cfg, settings.dicom.ae_title),
    "stowrs": lambda name, cfg, settings: StowRsTarget(
        name, cfg, hub_proxy(settings.hub) if cfg.through_proxy else None),
}


def make_target(name: str, settings: Settings, extra: dict[str, TargetType] | None = None
                ) -> TargetType:
    """The target for destination ``name``; ``extra`` holds targets the daemon built itself
    (the enrolled hub)."""
    if extra and name in extra:
        return extra[name]
    config = settings.destinations.get(name)
    if (config is None and name == "hub") or (config is not None and config.kind == "hub"):
        # The daemon puts the hub into ``extra`` when enrolled; reaching here means it is not.
        # The job waits for the credentials, its attempts not counted, as studies that reach
        # the hub by the default route do (store/awaiting_hub.py): a rule naming the hub
        # before the enrolment (docs/install.md, "enrol later") failed its jobs for good,
        # each to be retried by hand once enrolled. The start after `pas enroll` sends them.
        raise TrustRefused(f"destination {name!r}: this appliance is not enrolled with a "
                           "regional hub yet (pas enroll --hub URL, then restart PAS: the "
                           "jobs waiting for it go then)")
    if config is None:
        # Renamed or removed in the TOML while jobs to it were queued: they wait, uncounted,
        # for a configuration that names it again (the next start makes them due). They
        # failed for good here, and `pas queue retry` could not help.
        raise NotConfigured(f"destination {name!r} is not configured (renamed or removed "
                            "from the configuration?): the job waits until a configuration "
                            f"naming {name!r} again is in force (then restart PAS); "
                            "pas config check counts such jobs")
    factory = FACTORIES.get(config.kind)
    if factory is None:
        raise PermanentError(f"destination kind {config.kind!r} is not available")
    return factory(name, config, settings)


__all__ = ["DicomDestination", "NotConfigured", "PermanentError", "TargetType",
           "make_target"]
