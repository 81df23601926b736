"""``pas doctor``'s time zone row: the zone PAS reads its local times in, and a warning when
it is UTC while settings that are local time are in use.

Owns: naming the process's local zone (``TZ``, else /etc/localtime) and the verdict. May not
touch: state, or how the rest of PAS reads local time (it reads the process's zone:
``datetime.now()``, naive ``timestamp()``).

Local time is read by: HL7 times sent without an offset (prefetch/messages.py), the WAN rate
windows ``hub.windows`` (transfer/throttle.py), ``prefetch.windows`` (prefetch/fetcher.py)
and the worklist's day and times (prefetch/mwl.py). The appliance image's Debian base is
UTC: a site that never set its zone ran each of them 1 h (winter) to 2 h (summer) off a
French clock, and nothing said so (clock review, 2026-12-07, F4).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from appliance.config import Settings
from appliance.ops.doctor import Check

ZONEINFO = Path("/usr/share/zoneinfo")
LOCALTIME = Path("/etc/localtime")
TIMEZONE = Path("/etc/timezone")
# Names of UTC itself (Etc/UTC, the Debian base's, and its aliases): a zone of offset 0 with
# another name (Africa/Abidjan, Atlantic/Reykjavik) is a site's real one, not a zone unset.
UTC_NAMES = {"UTC", "UCT", "Universal", "Zulu", "GMT", "GMT0", "GMT+0", "GMT-0", "Greenwich"}
ZONE_FIX = ("timedatectl set-timezone Europe/Paris (the site's zone: timedatectl "
            "list-timezones), then systemctl restart pas; on a new appliance, the seed's "
            'timezone = "Europe/Paris" (docs/install.md)')


def local_zone(environ: Mapping[str, str] | None = None, localtime: Path = LOCALTIME,
               timezone_file: Path = TIMEZONE) -> tuple[str, str]:
    """(the zone's name, where it comes from) as the C library finds it for this process:
    ``TZ`` when set, else /etc/localtime (a symlink into the zone files, as timedatectl
    makes it; a copied file is named by /etc/timezone); none at all is UTC."""
    environ = os.environ if environ is None else environ
    tz = environ.get("TZ")
    if tz is not None:
        name = tz[1:] if tz.startswith(":") else tz
        if "/zoneinfo/" in name:  # TZ=/usr/share/zoneinfo/Europe/Paris
            name = name.rsplit("/zoneinfo/", 1)[1]
        return name or "UTC", f"TZ={tz} in this process's environment"
    try:
        target = os.readlink(localtime)
    except FileNotFoundError:
        return "UTC", f"no {localtime}"
    except OSError:  # a file, not a symlink: a copy of the zone's
        try:
            name = timezone_file.read_text().strip()
        except OSError:
            name = ""
        return name or "unnamed", f"{localtime} (a copy; {timezone_file} names it)"
    if "zoneinfo/" in target:
        return target.rsplit("zoneinfo/", 1)[1], f"{localtime} -> {target}"
    return target, f"{localtime} -> {target}"


def _offset(seconds: int) -> str:
    sign = "-" if seconds < 0 else "+"
    minutes = abs(seconds) // 60
    return f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def local_time_uses(settings: Settings) -> list[str]:
    """The settings in force that are read in local time."""
    uses = []
    if settings.hub.windows:
        uses.append("the WAN rate windows (hub.windows)")
    prefetch = settings.prefetch
    if prefetch.enabled:
        if prefetch.windows:
            uses.append("the prefetch windows (prefetch.windows)")
        if settings.hl7.enabled:  # the listener runs with the prefetch only
            uses.append("HL7 times sent without an offset (hl7)")
        if prefetch.mwl.enabled:
            uses.append("the worklist's day and times (prefetch.mwl)")
    return uses


def check_time_zone(settings: Settings, environ: Mapping[str, str] | None = None,
                    now: float | None = None) -> Check:
    """The zone PAS reads local times in (this process's, which pas.service's is unless its
    unit sets TZ), its offset now; a warning when it is UTC while local-time settings are in
    use. UTC is told by its name (Etc/UTC and aliases, a zone file missing) and an offset of
    0 all year, as the C library applies it: a name glibc cannot load is UTC too."""
    environ = os.environ if environ is None else environ
    name, source = local_zone(environ)
    now = time.time() if now is None else now
    year = time.localtime(now).tm_year
    offsets = {time.localtime(time.mktime((year, month, 1, 12, 0, 0, 0, 0, -1))).tm_gmtoff
               for month in (1, 7)}
    current = time.localtime(now)
    bare = name.removeprefix("Etc/")
    unknown = bare not in UTC_NAMES and name != "unnamed" and not (ZONEINFO / name).is_file()
    is_utc = offsets == {0} and (bare in UTC_NAMES or unknown or name == "unnamed")
    shell = ("; pas.service's is /etc/localtime's unless its unit sets TZ"
             if "TZ" in environ else "")
    if unknown and is_utc:
        where = f"{name} is no time zone of {ZONEINFO}, read as UTC ({source}{shell})"
    elif is_utc:
        where = f"{name} ({source}{shell})"
    else:
        where = f"{name}, now {_offset(current.tm_gmtoff)} {current.tm_zone} ({source}{shell})"
    uses = local_time_uses(settings)
    if is_utc and uses:
        return Check("time zone", "warn",
                     f"{where}; yet {', '.join(uses)} are local time: at a site in France "
                     "they run 1 h (winter) to 2 h (summer) late (an 08:00-19:00 rate cap in "
                     "force 10:00-21:00)", ZONE_FIX)
    if is_utc:
        return Check("time zone", "ok", f"{where}; no setting in force reads local time")
    return Check("time zone", "ok", f"{where}: HL7 times without an offset, the rate and "
                 "prefetch windows and the worklist are read in it")
