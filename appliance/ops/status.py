"""One status snapshot, shared by ``pas status``, the status page and the heartbeat."""

from __future__ import annotations

import shutil
from typing import Any

from appliance import __version__
from appliance.config import Settings
from appliance.ops import index_check
from appliance.ops.backup import backup_state
from appliance.store import awaiting_hub, index
from appliance.store import cache as cache_store
from appliance.store import commitment as commitment_store
from appliance.store import jobs as job_store
from appliance.store import ops as ops_store
from appliance.store import prefetch as prefetch_store
from appliance.store import uplink as uplink_store
from appliance.store.db import Database


def collect(settings: Settings, db: Database) -> dict[str, Any]:
    totals = index.totals(db)
    by_kind = job_store.counts_by_state(db)
    states: dict[str, int] = {}
    for per_state in by_kind.values():
        for state, count in per_state.items():
            states[state] = states.get(state, 0) + count
    disk = shutil.disk_usage(settings.home if settings.home.exists() else ".")
    return {
        "version": __version__,
        "site": settings.site,
        "ae_title": settings.dicom.ae_title,
        **totals,
        "jobs": states,
        "jobs_by_kind": by_kind,
        "backlog": job_store.backlog_by_destination(db),
        # Studies waiting, each once (a study routed to two destinations is one): what the
        # page's Backlog card and the heartbeat say; "backlog" has them per destination.
        "backlog_studies": job_store.backlog_studies(db),
        # Storage Commitment reports the modalities wait for (store/commitment.py): pending
        # (count, oldest's age, per modality AE with its last error) and given up.
        "commitment": commitment_store.backlog(db),
        # Prefetch requests pending, waiting for the link, failed in 24 h, late (store/ops.py).
        "prefetch": ops_store.prefetch_summary(db),
        # Instances routed nowhere before the enrolment: the first enrolled start sends them
        # to the hub (store/awaiting_hub.py).
        "awaiting_enrolment": dict(zip(("instances", "studies"), awaiting_hub.waiting(db),
                                       strict=True)),
        # Destinations refusing this appliance's credentials: their jobs wait, none fails.
        "credentials_refused": credentials_refused(db),
        # Destinations the jobs name and this configuration does not (renamed or removed):
        # their jobs wait, uncounted, for a configuration naming it again; none fails.
        # [{"destination", "queued", "failed"}], queued first.
        "unconfigured_destinations": job_store.waiting_for_configuration(
            db, sorted(settings.destinations)),
        # Per destination: "up"/"down", last successful contact, last error (store/uplink.py).
        "links": uplink_store.link_states(db),
        # The daemon's last integrity check of the index (ops/index_check.py), None before
        # any: path, checked_at, duration_s, finding (None: sound).
        "index_check": index_check.as_status(settings.home),
        # The newest backup, as pas doctor judges it (ops/backup.py): last_at, folder, age_s,
        # index_since, stale (past two days, or none ever on an index older than that).
        "backup": backup_state(db),
        # Integrity flags and the disk alert (store/cache.py, issue 7).
        "cache": cache_store.health(db),
        "disk": {
            "path": str(settings.home),
            "total_bytes": disk.total,
            "free_bytes": disk.free,
            "used_percent": round(100 * (disk.total - disk.free) / disk.total, 1),
            "spool_bytes": totals["bytes"],
        },
    }


def credentials_refused(db: Database) -> list[dict[str, Any]]:
    """What waits for credentials to be put right, per destination: ``waiting`` of ``what``
    (jobs; for ``prefetch``, the region's hub refusing the certificate, prefetch requests)
    and the latest refusal."""
    refused = [{"destination": row["destination"], "waiting": row["jobs"], "what": "job",
                "error": row["error"]} for row in job_store.waiting_for_credentials(db)]
    prefetch = prefetch_store.waiting_for_credentials(db)
    if prefetch is not None:
        refused.append({"destination": "prefetch", "waiting": prefetch["requests"],
                        "what": "prefetch request", "error": prefetch["error"]})
    return refused


def human_size(n: float) -> str:
    """Bytes for people: 1.5 MB, 820 kB (SI units, as disks and links are sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
