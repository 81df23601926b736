"""``pas doctor``: check what usually goes wrong on a new site, and say what to fix.

Owns: the checks (configuration, database, ports, disk, enrolment, certificate, hub
reachability, clock skew, time zone, DICOM destinations, Storage Commitment reports, the last
backup's age, the audit trail's copy and chain) and their verdicts. May not touch: state. Every
check is read-only: it opens the database, binds a port only to learn whether it is free
(and closes it), and sends a C-ECHO or an HTTPS GET.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from appliance.config import (
    ConfigError,
    DicomDestination,
    Settings,
    default_config_path,
    load_settings,
    problems_the_environment_hides,
)
from appliance.config_types import loopback_host
from appliance.ops import index_check
from appliance.ops.home_lock import lock_file
from appliance.ops.listeners import listening_pids, lock_holder, process_name
from appliance.store.db import Database
from appliance.transfer.http import http_client
from appliance.words import ago, counted

Verdict = Literal["ok", "warn", "fail"]
MAX_SKEW_WARN_S = 30.0
MAX_SKEW_FAIL_S = 300.0
HUB_TIMEOUT_S = 10.0
# A certificate unusable or about to be: the hint an operator can follow as it is written
# (``pas enroll`` alone refuses an appliance already enrolled).
ENROL_AGAIN = ("ask regional ops for a new token, then: pas enroll --replace --hub URL (it asks "
               "for the token; or --token-file FILE)")


@dataclass
class Check:
    name: str
    verdict: Verdict
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _dicom_answers(host: str, port: int, ae_title: str) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from appliance.ingest.policy import DOCTOR_AE

    # Let through by the daemon from this machine, Verification only (no refusal audited).
    ae = AE(ae_title=DOCTOR_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        # A PAS that refuses unknown AEs still answers with an A-ASSOCIATE-RJ: it is there.
        return bool(assoc.is_rejected)
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def _tcp_answers(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` opens (the MLLP listener answers only
    messages: a connection is all that can be asked of it without sending one)."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _http_answers(host: str, port: int) -> bool:
    """``/healthz`` answers, over HTTP or, with ``serving.tls_cert``, HTTPS (whose
    certificate this asks nothing of: it checks that PAS answers, not who signed it)."""
    where = f"[{host}]" if ":" in host else host  # an IPv6 literal, as URLs write it
    for scheme in ("http", "https"):
        try:
            with http_client(timeout=5, verify=False) as client:
                response = client.get(f"{scheme}://{where}:{port}/healthz")
            if response.status_code == 200 and response.json().get("status") == "ok":
                return True
        except (httpx.HTTPError, ValueError):
            continue
    return False


def _port_check(name: str, host: str, port: int, what: str,
                is_ours: Callable[[str], bool], daemon_pid: int | None) -> Check:
    """A port is fine when this home's daemon listens on it, or when it is free to bind;
    anything else listening there is a conflict to fix. ``daemon_pid``: the process holding
    this home's lock (the running daemon), None when none runs. "Ours" is decided by the
    process that listens where the kernel tells it (ops/listeners.py), by the protocol
    otherwise: another DICOM program answers a C-ECHO as well as PAS does."""
    # Every address: probe loopback (IPv6's "::" too: http://:::PORT is no URL).
    probe_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        with socket.create_connection((probe_host, port), timeout=1):
            listening = True
    except OSError:
        listening = False
    if listening:
        owners = listening_pids(port)  # None: the kernel would not say
        free_it = (f"stop it (ss -ltnp 'sport = :{port}') or change the port in the "
                   "configuration")
        if owners and daemon_pid not in owners:
            named = ", ".join(f"{process_name(pid)} (pid {pid})" for pid in sorted(owners))
            whose = (f", not this home's PAS (pid {daemon_pid})" if daemon_pid is not None
                     else "; no PAS daemon runs on this home")
            return Check(name, "fail", f"{host}:{port}: another program listens there "
                         f"({named}){whose}", free_it)
        if not owners and daemon_pid is None:
            return Check(name, "fail", f"{host}:{port}: another program listens there, "
                         "and no PAS daemon runs on this home", free_it)
        if not is_ours(probe_host):
            if owners:  # the daemon's own socket, and it does not answer
                return Check(name, "fail", f"{host}:{port}: PAS (pid {daemon_pid}) listens "
                             "but does not answer", "see its log: journalctl -u pas")
            return Check(name, "fail", f"{host}:{port}: another program listens there",
                         free_it)
        return Check(name, "ok", f"{host}:{port}: {what} (pid {daemon_pid}) answers")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # "::" is IPv6's any
        with socket.socket(family) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except PermissionError:
        return Check(name, "fail", f"no permission to bind {host}:{port}",
                     "ports below 1024 need CAP_NET_BIND_SERVICE: install "
                     "image/systemd/pas.service.d/port-104.conf")
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return Check(name, "fail", f"{host}:{port} is taken by another program",
                         f"free the port (ss -ltnp 'sport = :{port}') or change it in the "
                         "configuration")
        return Check(name, "fail", f"cannot bind {host}:{port}: {exc}",
                     "check the host address in the configuration")
    if daemon_pid is not None:
        # It runs (it holds this home's lock) but not where these settings say: started
        # with others (PAS_* variables of its own shell, another --config). "Not running"
        # sent an operator to start a second one.
        return Check(name, "warn", f"{host}:{port} is free, yet PAS (pid {daemon_pid}) runs "
                     "on this home: it was started with other settings",
                     "run pas doctor with the daemon's settings (its PAS_* variables: "
                     f"tr '\\0' '\\n' < /proc/{daemon_pid}/environ | grep ^PAS_)")
    return Check(name, "warn", f"{host}:{port} is free: the daemon is not running",
                 "start it: systemctl start pas (or pas run)")


def check_disk(settings: Settings) -> Check:
    path = settings.home if settings.home.exists() else Path(".")
    usage = shutil.disk_usage(path)
    used = 100 * (usage.total - usage.free) / usage.total
    floor = settings.storage.min_free_mb * 1024 * 1024
    detail = f"{used:.1f} % used, {usage.free / 1e9:.1f} GB free on {path}"
    if usage.free < floor:
        return Check("disk", "fail", detail + f" (below storage.min_free_mb = "
                     f"{settings.storage.min_free_mb})",
                     "free space, or let the cache evict confirmed studies (pas cache)")
    alert = _recorded_disk_alert(settings)
    if alert is not None and alert.startswith("hard limit"):
        return Check("disk", "fail", f"{detail}; the daemon's disk alert: {alert}",
                     "free space or raise the limit it names; the cache evicts only what "
                     "the region confirmed (pas status: the backlog)")
    if alert is not None:
        return Check("disk", "warn", f"{detail}; the daemon's disk alert: {alert}",
                     "plan more space, a lower retention, or fewer pins (pas cache status)")
    if used > 85:
        return Check("disk", "warn", detail, "over 85 %: plan more space or a lower retention")
    return Check("disk", "ok", detail)


@contextlib.contextmanager
def _index(settings: Settings) -> Iterator[Database | None]:
    """The index opened read-only for one check and closed after it; None when it is missing
    or does not open (the database check says why: the others say nothing of it)."""
    if not settings.db_path.exists():
        yield None
        return
    try:
        db = Database(settings.db_path, readonly=True)
    except Exception:  # any failure is the database check's finding
        yield None
        return
    try:
        yield db
    finally:
        db.close()


def _recorded_disk_alert(settings: Settings) -> str | None:
    """The daemon's disk alert as last recorded (its audit row, store/cache.py), which also
    watches ``storage.quota_mb`` and the watermarks: the file system's figures alone said
    "ok" while C-STOREs were refused at the quota. None without a readable database (the
    database check says why)."""
    from appliance.store import cache as cache_store

    with _index(settings) as db:
        if db is None:
            return None
        try:
            alert = cache_store.raised_disk_alert(db)
            return alert["detail"] if alert else None
        except Exception:
            return None


def _echo(calling: str, title: str, host: str, port: int,
          tls_args: tuple[Any, str | None] | None) -> str | None:
    """None when ``title``@``host``:``port`` answers a C-ECHO with success, else what
    happened."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    assoc = ae.associate(host, port, ae_title=title, tls_args=tls_args)  # type: ignore[arg-type]
    if not assoc.is_established:
        if tls_args is not None and not assoc.is_rejected:
            from appliance.ops.security import tls_handshake_refusal

            refusal = tls_handshake_refusal(tls_args, host, port, 5)
            if refusal is not None:
                return refusal[1]
        return "association refused or no answer"
    status = assoc.send_c_echo()
    assoc.release()
    return None if bool(status) and status.Status == 0 else "C-ECHO failed"


def check_destinations(settings: Settings) -> list[Check]:
    """A C-ECHO to every DICOM node PAS sends to: the routing destinations (a failure: the
    studies routed there wait), then the C-MOVE destinations viewers name (a warning: a
    workstation may be off for the night). Over DICOM TLS where PAS would use it; the
    destinations' checks went in clear (a TLS node failed), and the move destinations had
    none (a mistyped port showed only when a radiologist's C-MOVE failed, 0xA702)."""
    from appliance.ops.security import OutgoingDicomTls, destination_tls_args

    checks = []
    for name, destination in sorted(settings.destinations.items()):
        if not isinstance(destination, DicomDestination):
            continue
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        try:
            tls_args = destination_tls_args(destination)
            problem = _echo(destination.calling_ae_title or settings.dicom.ae_title,
                            destination.ae_title, destination.host, destination.port, tls_args)
        except Exception as exc:  # a certificate file missing, unreadable, a key too open
            problem = f"not tried: {exc}"
        checks.append(Check(f"destination {name}", "fail" if problem else "ok",
                            f"C-ECHO {where}{' over TLS' if destination.tls else ''}: "
                            f"{problem or 'success'}",
                            f"check that {where} is up and knows our AE title" if problem
                            else ""))
    listener = settings.dicom.tls
    outgoing = OutgoingDicomTls(listener.ca, listener.cert, listener.key)
    for node in settings.serving.move_destinations:
        where = f"{node.title}@{node.host}:{node.port}"
        use_tls = node.uses_tls(listener.enabled)
        try:
            problem = _echo(settings.dicom.ae_title, node.title, node.host, node.port,
                            outgoing.tls_args(use_tls, node.host if node.tls_check_hostname
                                              else None))
        except Exception as exc:
            problem = f"not tried: {exc}"
        checks.append(Check(f"move destination {node.title}", "warn" if problem else "ok",
                            f"C-ECHO {where}{' over TLS' if use_tls else ''}: "
                            f"{problem or 'success'}",
                            f"a viewer's C-MOVE to {node.title} fails while this lasts: check "
                            "that the workstation is on and that serving.move_destinations "
                            "has its address and port" if problem else ""))
    return checks


def check_database(settings: Settings) -> Check:
    from appliance.store.damage import damage_of
    from appliance.store.ops import schema_drift_of, schema_version_of
    from appliance.store.schema import MIGRATIONS

    path = settings.db_path
    if not path.exists():
        return Check("database", "warn", f"{path} does not exist yet",
                     "it is created at the first start; check PAS_HOME if PAS already ran")
    try:
        version = schema_version_of(path)
    except Exception as exc:  # any failure here is the finding
        return Check("database", "fail", f"{path}: {exc}",
                     "check PAS_HOME and its permissions (owner pas, mode 0750)")
    if version > len(MIGRATIONS):
        return Check("database", "fail", f"{path}: schema {version} is newer than this "
                     f"software ({len(MIGRATIONS)})", "install the newer PAS version again")
    if version < len(MIGRATIONS):  # the other checks, which read the index, said nothing
        return Check("database", "warn", f"{path}: schema {version} is older than this "
                     f"software's ({len(MIGRATIONS)}): not migrated yet, so the stored files, "
                     "jobs and backups were not checked",
                     "systemctl restart pas (the daemon migrates it at its start; "
                     "journalctl -u pas says how it went)")
    try:
        drift = schema_drift_of(path, MIGRATIONS)
    except Exception:  # unreadable: the integrity check below says it
        drift = []
    if drift:
        tables = any(words.startswith("table ") for words in drift)
        return Check("database", "fail", f"{path}: its schema differs from this version's "
                     f"(another build of PAS wrote it): {'; '.join(drift)}",
                     "restore a backup of this version, or set the index aside: systemctl "
                     "stop pas; pas cache rebuild-index" if tables else
                     "systemctl restart pas: the start brings its indexes and triggers to "
                     "this version's definitions")
    try:
        finding = damage_of(path, thorough=index_check.found_damaged(settings.home))
    except Exception as exc:  # cannot read it through: said, not taken for damage
        return Check("database", "warn", f"{path}, schema {version}: integrity not checked "
                     f"({exc})", "run pas doctor as the appliance's user (sudo -u pas)")
    daemon_found = index_check.load(settings.home)
    if finding is not None:
        if daemon_found is not None and daemon_found.damaged:  # when it was first seen
            finding += (f" (the daemon's integrity check found it "
                        f"{ago(time.time() - daemon_found.checked_at)})")
        return Check("database", "fail", f"{path} is damaged: {finding}",
                     "systemctl stop pas; pas cache rebuild-index (sets the damaged file "
                     "aside); systemctl start pas (start-up recovery indexes the spool again)")
    return Check("database", "ok", f"{path}, schema {version}, integrity checked")


def check_commitment(settings: Settings) -> list[Check]:
    """Storage Commitment reports a modality has waited for over
    :data:`appliance.store.commitment.STUCK_AFTER_S`, each naming the AE and the last
    error; reports given up in the last 24 h; and modalities that asked for commitment but
    have no address, so that a report they do not wait for on their own association can
    never reach them.
    Nothing when the database is missing or unreadable (the database check says so)."""
    from appliance.store import commitment

    if not settings.dicom.storage_commitment:
        return []
    with _index(settings) as db:
        if db is None:
            return []
        try:
            reports, askers = commitment.backlog(db), commitment.askers(db)
        except Exception as exc:
            return [Check("storage commitment", "fail", f"cannot read the reports: {exc}",
                          "run pas doctor again; if it persists, see journalctl -u pas")]
    addressed = {ae.title for ae in settings.dicom.known_aes if ae.host and ae.port}
    addressed |= {d.title for d in settings.serving.move_destinations}
    checks = []
    for row in reports["by_ae"]:
        if row["oldest_age_s"] <= commitment.STUCK_AFTER_S:
            continue
        ae = row["calling_ae"]
        error = row["last_error"] or "not tried yet"
        fix = (f"give {ae} host and port in dicom.known_aes (where its Storage Commitment "
               "SCU listens)" if ae not in addressed else
               f"check that {ae} is on and accepts PAS's association for Storage "
               "Commitment at the host and port of its dicom.known_aes entry "
               "(restart PAS to try at once)")
        tries = counted(row["attempts"], "attempt")
        checks.append(Check(f"storage commitment {ae}", "warn",
                            f"{counted(row['pending'], 'report')} pending for "
                            f"{row['oldest_age_s'] / 60:.0f} min ({tries}); last error: {error}",
                            fix))
    for asker in askers:
        ae = asker["calling_ae"]
        if ae in addressed or any(c.name == f"storage commitment {ae}" for c in checks):
            continue
        checks.append(Check(
            f"storage commitment {ae}", "warn",
            f"{ae} asked for Storage Commitment ({counted(asker['requests'], 'request')}) "
            "but PAS has no address for it: if it closes its association before the report, "
            "the report cannot reach it",
            f"give {ae} host and port in dicom.known_aes (where its Storage Commitment SCU "
            "listens)"))
    if reports["given_up_24h"]:
        checks.append(Check("storage commitment", "warn",
                            f"{counted(reports['given_up_24h'], 'report')} given up in the "
                            "last 24 h: those modalities keep their copies",
                            "pas audit --event commitment --failures names them"))
    if not checks:
        oldest = reports["oldest_age_s"]
        checks.append(Check("storage commitment", "ok",
                            f"{counted(reports['pending'], 'report')} pending" +
                            (f", the oldest {oldest:.0f} s" if oldest is not None else "")))
    return checks


FAILED_JOBS_NAMED = 1000


def check_stored_data(settings: Settings) -> list[Check]:
    """Stored files flagged missing or damaged (start-up recovery, the daemon's scrub, pas
    verify), and jobs that failed: pas doctor said all was well (exit 0) while images were
    lost (for those the region has not confirmed, the only copy) or a study never reached a
    destination; only pas status and pas queue list showed it. Nothing when the database is
    missing or unreadable (the database check says so)."""
    from appliance.store import cache as cache_store
    from appliance.store import jobs as job_store

    with _index(settings) as db:
        if db is None:
            return []
        try:
            issues = cache_store.health(db)["integrity_issues"]
            failed = job_store.count_jobs(db, "failed")
            named = job_store.list_jobs(db, "failed", FAILED_JOBS_NAMED) if failed else []
        except Exception as exc:
            return [Check("stored files", "fail", f"cannot read the index: {exc}",
                          "run pas doctor again; if it persists, see journalctl -u pas")]
    if issues:
        found = ", ".join(f"{kind.replace('_', ' ')} {n}" for kind, n in sorted(issues.items()))
        checks = [Check("stored files", "fail",
                        f"flagged: {found} (pas cache status lists them)",
                        "pas verify --repair restores from the region those it confirmed; "
                        "send the others again from their modality")]
    else:
        checks = [Check("stored files", "ok", "none flagged missing or damaged")]
    if failed:
        by_destination: dict[str, int] = {}
        for job in named:
            by_destination[job["destination"]] = by_destination.get(job["destination"], 0) + 1
        where = ", ".join(f"{name} {n}" for name, n in sorted(by_destination.items()))
        last = (named[0]["last_error"] or "no error recorded")[:160]
        checks.append(Check("jobs", "warn",
                            f"{counted(failed, 'job')} failed ({where}); the last: {last}",
                            "pas queue list --state failed says why; put it right, then "
                            "pas queue retry ID"))
    else:
        checks.append(Check("jobs", "ok", "none failed"))
    return checks


def check_unconfigured_destinations(settings: Settings) -> list[Check]:
    """Jobs naming a destination this configuration does not have (renamed or removed while
    studies were queued for it): they wait, uncounted, and never fail, so neither the
    failed-jobs row nor the exit status said anything; only pas config check did. A warn
    row names the destinations and how many jobs each, with the fix. Nothing when there
    are none, or the index cannot be read (the database check says why)."""
    from appliance.store import jobs as job_store

    with _index(settings) as db:
        if db is None:
            return []
        try:
            rows = job_store.waiting_for_configuration(db, sorted(settings.destinations))
        except Exception:  # the database check and the stored-data check say it
            return []
    queued = [row for row in rows if row["queued"]]
    if not queued:
        return []
    where = ", ".join(f"{row['destination']!r} {row['queued']}" for row in queued)
    total = sum(row["queued"] for row in queued)
    return [Check("jobs waiting for the configuration", "warn",
                  f"{counted(total, 'job')} name{'s' if total == 1 else ''} a destination "
                  f"this configuration does not have ({where}): they wait, uncounted, and "
                  "never fail",
                  "put the name back under [destinations] (renamed? the jobs keep the old "
                  "name) and restart PAS; pas queue list --state pending shows them")]


def _config_fix(problem: str) -> str:
    """What to do about a configuration problem: a key to fix, or the file itself (not
    found, unreadable, not TOML), where "fix this key" named no key."""
    variable = re.search(r"\(set by (\w+)\)$", problem)
    if variable:  # the environment's value, not the file's (config.name_the_variables)
        return f"fix or unset {variable.group(1)} (the unit's Environment=, or the shell's)"
    if re.match(r"[a-z_][a-z0-9_.]*: ", problem):
        return "fix this key in the TOML file (pas config check)"
    return "give the configuration file pas run reads (--config, PAS_CONFIG), or fix it " \
           "(pas config check)"


def run_checks(config_path: Path | None = None) -> list[Check]:
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        return [Check("configuration", "fail", problem, _config_fix(problem))
                for problem in exc.problems]
    # The file's own values a PAS_* variable replaces now: pas config check refuses them,
    # and pas run will the day the variable goes (doctor said "configuration ok").
    checked = config_path or default_config_path()
    hidden = problems_the_environment_hides(checked) if checked is not None else []
    checks = [Check("configuration", "warn",
                    f"in {checked} (a PAS_* variable replaces it now; without it pas run "
                    f"refuses the file): {problem}", _config_fix(problem))
              for problem in hidden]
    if not hidden:
        checks.append(Check("configuration", "ok",
                            f"AE {settings.dicom.ae_title}, home {settings.home}, "
                            f"{counted(len(settings.destinations), 'destination')}"))
    checks.append(check_database(settings))
    dicom, http = settings.dicom, settings.http
    daemon_pid = lock_holder(lock_file(settings.home))
    checks.append(_port_check("DICOM port", dicom.host, dicom.port, "PAS (C-ECHO)",
                              lambda h: _dicom_answers(h, dicom.port, dicom.ae_title),
                              daemon_pid))
    if http.enabled:
        checks.append(_port_check("HTTP port", http.host, http.port, "status page",
                                  lambda h: _http_answers(h, http.port), daemon_pid))
    if settings.hl7.enabled:  # the RIS's orders: a port taken there lost every prefetch
        hl7 = settings.hl7
        checks.append(_port_check("HL7 port", hl7.host, hl7.port, "HL7 listener",
                                  lambda h: _tcp_answers(h, hl7.port), daemon_pid))
    checks.append(check_disk(settings))
    from appliance.ops.doctor_hub import check_enrolment  # it imports this module's Check

    checks.extend(check_enrolment(settings))
    from appliance.ops.doctor_time import check_time_zone  # it imports Check too

    checks.append(check_time_zone(settings))
    from appliance.ops.doctor_tls import check_tls_certificates  # it imports Check too

    checks.extend(check_tls_certificates(settings))
    checks.extend(check_destinations(settings))
    checks.extend(check_stored_data(settings))
    checks.extend(check_unconfigured_destinations(settings))
    checks.extend(check_commitment(settings))
    from appliance.ops.doctor_backup import check_backup, check_backup_sealing  # it imports Check

    checks.extend(check_backup(settings))
    checks.extend(check_backup_sealing(settings))
    from appliance.ops.doctor_audit import check_audit_chain, check_audit_copy  # Check too

    checks.append(check_audit_copy(settings))
    chain = check_audit_chain(settings)
    if chain is not None:
        checks.append(chain)
    for open_port in (check_open_http(settings), check_open_hl7(settings)):
        if open_port is not None:
            checks.append(open_port)
    return checks


def check_open_hl7(settings: Settings) -> Check | None:
    """The HL7 port open beyond this machine to any host (``hl7.allowed_sources`` empty):
    whoever reaches it sends orders, which pull a named patient's priors from the region,
    and merges. None otherwise."""
    hl7 = settings.hl7
    if not (hl7.enabled and settings.prefetch.enabled) or hl7.allowed_sources \
            or loopback_host(hl7.host):
        return None  # no listener runs without the prefetch (daemon._start_prefetch)
    return Check("HL7 access", "warn", f"{hl7.host}:{hl7.port} takes orders and merges from "
                 "every host that reaches it (hl7.allowed_sources is empty)",
                 "set hl7.allowed_sources to the interface engine's address (or network)")


def check_open_http(settings: Settings) -> Check | None:
    """The HTTP port open beyond this machine with ``serving.auth = "none"``: every host that
    reaches it reads every study (DICOMweb, the status page's patient IDs) and stores into
    the region (STOW-RS). The appliance image's first boot binds it to every interface, and
    nothing said so (security review, 2026-12-06). None when it is not open so."""
    http, serving = settings.http, settings.serving
    if not http.enabled or serving.auth != "none" or loopback_host(http.host):
        return None
    what = ("DICOMweb (read every study, STOW-RS into the region) and the status page"
            if serving.enabled else "the status page (patient IDs) and /metrics")
    return Check("HTTP access", "warn", f"{http.host}:{http.port} serves {what} to every host "
                 "that reaches it, with no credential (serving.auth = \"none\")",
                 "set serving.auth = \"bearer\" (with tls_cert and tls_key) or "
                 "\"client_cert\" (docs/operations.md, Access to the HTTP port), unless the "
                 "VLAN is trusted")
