"""Real peers for tests and benchmarks: PAS itself, DCMTK tools, Orthanc, network namespaces.

Every server binds to loopback, or inside a network namespace this module creates (addresses
from 198.18.0.0/15) and deletes. Nothing here sends traffic anywhere else. Waiting is done on
conditions (a port answers, a count is reached) with a deadline, never with bare sleeps.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.support import zygote
from tests.support.netns import NetNamespace
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
CT_DIR = SHARED_DATA / "ct-covid19-ny-sbu"
MR_DIR = SHARED_DATA / "mr-toshiba-dti"
PAS_BIN = Path(sys.executable).parent / "pas"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class PeerExited(RuntimeError):
    """A child process waited for has exited: :func:`wait_for` raises it at once."""


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except PeerExited:
            raise  # it will not come up: waiting on is the timeout spent for nothing
        except Exception as exc:  # the condition may fail until the peer is up
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                       + (f" (last error: {last_error})" if last_error else ""))


def closed_port(host: str = "127.0.0.1") -> socket.socket:
    """A port that refuses connections for as long as the returned socket stays open: bound,
    never listening. For a peer that is down for a while, then starts on that port (close
    the socket first). A port from :func:`free_port` left unbound that long was once taken
    by another test's listener, or as the source port of PAS's own retries to it (TCP's
    self-connect): the attempts were then answered, and counted."""
    sock = socket.socket()
    sock.bind((host, 0))
    return sock


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# --- PAS ---------------------------------------------------------------------------------


def run_pas(args: list[str], env: dict[str, str] | None = None, *, timeout: float = 120,
            cwd: Path | str | None = None, input: str | None = None,  # noqa: A002
            check: bool = False, exec_: bool = False) -> subprocess.CompletedProcess[str]:
    """``pas ARGS`` run to its end, its output captured as text: what
    ``subprocess.run([PAS_BIN, *args], env=env, capture_output=True, text=True, ...)`` gives.
    Forked from the warm interpreter when the environment allows (:func:`zygote.suits`):
    a new interpreter spends ~0.5 CPU-s importing before it does anything, and the suite
    ran ~360 commands that way. ``check`` raises as :func:`subprocess.run`'s does; ``exec_``
    for a test about the binary itself."""
    env = dict(os.environ) if env is None else env
    if not exec_ and zygote.suits(env):
        # In this process's directory, as subprocess.run (the warm one's is the project's).
        result = zygote.run(list(args), env, timeout=timeout, cwd=cwd or os.getcwd(),
                            input=input)
    else:
        result = subprocess.run([str(PAS_BIN), *args], env=env, capture_output=True,
                                text=True, timeout=timeout, cwd=cwd, input=input)
    if check:
        result.check_returncode()
    return result


class ChildProcess:
    """A ``pas`` command run as a child process: its own home, environment and log file;
    started, waited for on its ports, stopped (SIGTERM) or killed (kill -9)."""

    name = "pas"
    command: tuple[str, ...] = ("run",)
    cli_prefix: tuple[str, ...] = ()
    # Where its ports are probed from here, and what its command runs under (``ip netns
    # exec NS`` for a process inside a network namespace).
    probe_host = "127.0.0.1"
    launcher: tuple[str, ...] = ()

    def __init__(self, home: Path, env: dict[str, str], log_name: str):
        self.home = Path(home)
        self.env = env
        self.proc: subprocess.Popen[bytes] | zygote.ForkedProcess | None = None
        self.log_path = self.home / log_name

    def _launch(self, ports: list[int], timeout: float, cwd: Path | None = None,
                host: str = "127.0.0.1") -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            if self._warm():
                self.proc = zygote.spawn(list(self.command), self.env, cwd,
                                         stdout=log.fileno(), stderr=log.fileno())
            else:
                self.proc = subprocess.Popen([*self.launcher, str(PAS_BIN), *self.command],
                                             env=self.env, stdout=log,
                                             stderr=subprocess.STDOUT, cwd=cwd)
        # The address given (a namespace link's end), else the class's (the hub in one).
        probe = host if host != "127.0.0.1" else self.probe_host
        for port in ports:
            wait_for(lambda p=port: self._alive() and port_open(probe, p), timeout,
                     what=f"{self.name} on {probe} port {port} (log: {self.log_path})")

    def _warm(self) -> bool:
        """Forked from the warm interpreter: unless under a launcher, or with an environment
        only a new interpreter reads whole, or with ``PAS_TEST_EXEC=1``
        (:func:`zygote.suits`)."""
        return not self.launcher and zygote.suits(self.env)

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise PeerExited(f"{self.name} exited with {self.proc.returncode}: "
                               f"{self.log()[-2000:]}")
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logged_at(self, what: str) -> float:
        """When the last log line containing ``what`` was written (epoch seconds; the log's
        own timestamps, to the millisecond)."""
        line = [line for line in self.log().splitlines() if what in line][-1]
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @contextlib.contextmanager
    def stopped_if_start_fails(self) -> Iterator[None]:
        """Around a start: if it raises (its port or ready line not seen in time on a loaded
        machine), the process it launched is stopped. The caller never got the peer back
        to stop it: it ran on for the rest of the session, holding its ports."""
        try:
            yield
        except BaseException:
            self.stop()
            raise

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The process stopped (SIGSTOP) inside the block, continued after it (also on
        failure): a request it is serving can neither be answered nor fail, so what a test
        does meanwhile (cut its link) lands in the middle of it, however loaded the
        machine is."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """kill -9: no clean-up of any kind."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [*self.cli_prefix, *args]
        result = run_pas(command, self.env, timeout=120, exec_=bool(self.launcher))
        if check and result.returncode != 0:
            raise AssertionError(f"pas {' '.join(command)} -> {result.returncode}\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result


class PasProcess(ChildProcess):
    """``pas run`` as a child process with a private home and environment overrides."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, ae_title: str = "PAS"):
        self.port = free_port()
        self.http_port = free_port()
        self.hl7_port = free_port()
        self.ae_title = ae_title
        super().__init__(home, {
            **os.environ,
            "PAS_HOME": str(home),
            "PAS_DICOM__HOST": "127.0.0.1",
            "PAS_DICOM__PORT": str(self.port),
            "PAS_DICOM__AE_TITLE": ae_title,
            "PAS_HTTP__HOST": "127.0.0.1",
            "PAS_HTTP__PORT": str(self.http_port),
            "PAS_STUDY__STABLE_AFTER_S": "1",
            "PAS_STUDY__CHECK_INTERVAL_S": "0.2",
            "PAS_QUEUE__POLL_INTERVAL_S": "0.2",
            "PAS_STORAGE__MIN_FREE_MB": "0",
            # The cache's watermarks against a quota, not the host's file system: on a CI disk
            # over 90 % full every daemon would raise its disk alert and evict the studies
            # the tests just had confirmed. The tests of a full disk set their own.
            "PAS_STORAGE__QUOTA_MB": str(1 << 20),
            # Each daemon its own HL7 port: the default 2575 would collide between tests.
            "PAS_HL7__HOST": "127.0.0.1",
            "PAS_HL7__PORT": str(self.hl7_port),
            **(env or {}),
        }, "pas.log")

    def start(self, timeout: float = 30.0) -> PasProcess:
        """Start and wait for the ready line. A port :func:`free_port` gave that another
        test's peer took before this daemon bound it (its start refused: "Address already
        in use", seen in a CI run) is replaced by a new one, twice at most, when it is this
        object's own (not one the test set). So is its own HL7 port: PAS starts without its
        HL7 listener when that port is taken (it serves images all the same), and a test
        once sent its HL7 order to the other test's HTTP server holding it."""
        for attempt in range(3):
            log_before = len(self.log())
            try:
                self._start_once(timeout)
            except (RuntimeError, TimeoutError):
                refused = self.log()[log_before:]
                if attempt == 2 or "Address already in use" not in refused:
                    raise
                self._new_ports()
                continue
            if attempt < 2 and self._own_hl7_port_taken(self.log()[log_before:]):
                self.stop()
                self._new_ports()
                continue
            return self
        raise AssertionError("unreachable")

    def _own_hl7_port_taken(self, log: str) -> bool:
        return (self.env.get("PAS_HL7__PORT") == str(self.hl7_port)
                and f"HL7 listener cannot listen on 127.0.0.1:{self.hl7_port}" in log
                and "address already in use" in log.lower())

    def _new_ports(self) -> None:
        for attribute, key in (("port", "PAS_DICOM__PORT"), ("http_port", "PAS_HTTP__PORT"),
                               ("hl7_port", "PAS_HL7__PORT")):
            if self.env.get(key) == str(getattr(self, attribute)):
                setattr(self, attribute, free_port())
                self.env[key] = str(getattr(self, attribute))

    def _start_once(self, timeout: float) -> PasProcess:
        ready_before = self.log().count("PAS ready")
        ports = [self.port]
        if self.env.get("PAS_HTTP__ENABLED", "true").lower() != "false":
            ports.append(self.http_port)  # the HTTP app comes up just after the DICOM port
        # Awaited on loopback, or on the one address given (a test namespace's outer end:
        # then the HTTP app must be disabled or listen there too).
        host = self.env["PAS_DICOM__HOST"]
        with self.stopped_if_start_fails():
            self._launch(ports, timeout, cwd=self.home,
                         host="127.0.0.1" if host in ("", "0.0.0.0", "::") else host)
            # Its own "ready" line too: an open port alone may be another program's. A port
            # free_port() gave was taken meanwhile by another test's peer; this daemon exited
            # ("Address already in use") after the probe had found that peer listening, and
            # the test then talked to the peer (a CI run).
            wait_for(lambda: self._alive() and self.log().count("PAS ready") > ready_before,
                     timeout, what=f"{self.name}'s ready line (log: {self.log_path})")
        return self

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)


def half_written(spool: Path) -> list[Path]:
    """Temp files holding bytes: writes that did not finish. (The empty ones are created
    ahead for the next writes, appliance/store/spool.py's _TempFiles.)"""
    return [p for p in (spool / "tmp").glob("*") if p.stat().st_size]


# --- DCMTK -------------------------------------------------------------------------------


def storescu(paths: list[Path] | list[str] | Path, port: int, *, host: str = "127.0.0.1",
             called: str = "PAS", calling: str = "STORESCU", extra: list[str] = (),  # type: ignore[assignment]
             check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu as the modality (``TCP_NODELAY=1``; scans directories recursively)."""
    if isinstance(paths, Path | str):
        paths = [paths]  # type: ignore[list-item]
    args = ["storescu", "-aec", called, "-aet", calling, "+sd", "+r", *extra, host, str(port),
            *[str(p) for p in paths]]
    result = subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def on_small_disk(folder: Path, size_kb: int, argv: list[str]) -> list[str]:
    """``argv`` run with ``folder`` on a tmpfs of ``size_kb`` KiB of its own: a disk that
    fills up, for real (root only). The mount lives in a private mount namespace (``unshare
    --mount``): the host's mount table is not touched and the tmpfs goes when the process
    ends. Another process sees the files through ``/proc/<pid>/root`` (:func:`seen_from`)."""
    script = 'mount -t tmpfs -o size="$1"k pas-small-disk "$2" && shift 2 && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            str(size_kb), str(folder), *argv]


@contextlib.contextmanager
def small_disk_at(folder: Path, size_mb: int) -> Iterator[Path]:
    """``folder`` (made) as a tmpfs of ``size_mb`` MiB in this test's own mount table, for a
    test whose daemon or command must see it from outside (root only: CI runs as root, and
    a test that cannot mount fails rather than skips); unmounted after."""
    assert os.geteuid() == 0, "mounting a tmpfs needs root (CI runs as root)"
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "pas-small-disk",
                    str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def seen_from(pid: int, folder: Path) -> Path:
    """``folder`` as the process ``pid`` sees it (inside its own mount namespace)."""
    return Path(f"/proc/{pid}/root") / Path(folder).resolve().relative_to("/")


class StoreSCP:
    """DCMTK storescp writing what it receives, bit-preserving, to a folder.

    ``disk_kb``: the folder is a tmpfs of that size (:func:`on_small_disk`), so storescp
    answers 0xA700 (out of resources) once it is full."""

    def __init__(self, folder: Path, ae_title: str = "STORESCP", host: str = "127.0.0.1",
                 disk_kb: int | None = None):
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.host = host
        self.disk_kb = disk_kb
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, extra: list[str] = (),  # type: ignore[assignment]
              env: dict[str, str] | None = None) -> StoreSCP:
        """``env``: added to DCMTK's environment (the ingest benchmark preloads a shim)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = ["storescp", "-aet", self.ae_title, "--bit-preserving", "-od", str(self.folder),
                "+uf", *extra, str(self.port)]
        if self.disk_kb is not None:
            argv = on_small_disk(self.folder, self.disk_kb, argv)
        self.proc = subprocess.Popen(argv, env={**DCMTK_ENV, **(env or {})},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: self.proc.poll() is None and port_open("127.0.0.1", self.port),
                     15, what=f"storescp {self.ae_title}")
        except BaseException:
            self.stop()  # not listening in time: not left running (the caller never got it)
            raise
        return self

    def files(self) -> list[Path]:
        folder = self.folder
        if self.disk_kb is not None and self.proc is not None:
            folder = seen_from(self.proc.pid, self.folder)
        return sorted(p for p in folder.rglob("*") if p.is_file())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# --- Orthanc -------------------------------------------------------------------------------

# Orthanc's fsync of each file it stores (its default since 1.7.4). The suite turns it off
# (tests/conftest.py): filling an Orthanc with the MR set took 4.2 s, 2.3 s without, and a
# test's Orthanc never outlives a power cut (its files are written before it answers, in the
# page cache a kill leaves alone). The benchmarks keep it: they compare PAS with Orthanc as
# it is deployed.
ORTHANC_SYNCS_FILES = True


class Orthanc:
    """A real Orthanc with its DICOMweb plugin, inside its own network namespace.

    Orthanc 1.10 cannot bind to one address, so it runs in a namespace whose only links are
    loopback and a veth to this test; ``host`` is its address there.
    """

    def __init__(self, folder: Path, ae_title: str = "ORTHANC",
                 modalities: dict[str, list[Any]] | None = None,
                 ns: NetNamespace | None = None, extra_config: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.modalities = modalities or {}
        # ``ns``: run inside a namespace the caller created and will delete (bench/wan's site
        # and region ends); otherwise Orthanc gets its own. ``extra_config`` is merged last.
        self.owns_ns = ns is None
        self.ns = ns or NetNamespace("orthanc")
        self.extra_config = extra_config or {}
        self.http_port = 8042
        self.dicom_port = 4242
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return self.ns.inner_address

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 60.0) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.owns_ns:
            self.ns.create()
        try:
            self._run(timeout)
        except BaseException:
            self.stop()  # not answering in time: stopped, its own namespace deleted
            raise
        return self

    def _run(self, timeout: float) -> None:
        config = {
            "Name": self.ae_title,
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "StorageCompression": False,
            "SyncStorageArea": ORTHANC_SYNCS_FILES,
            "OverwriteInstances": False,
            "StableAge": 1,
            "DicomModalities": self.modalities,
            "Plugins": [ORTHANC_DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "ConcurrentJobs": 2,
            **self.extra_config,
        }
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        log = open(self.folder / "orthanc.log", "ab")
        # Orthanc's DICOM side is DCMTK's: without TCP_NODELAY each C-STORE (and each answer
        # it sends) waited out the peer's delayed ACK, 40 ms: the CT and MR sets took 26 s
        # to store into it, 2 s with it.
        self.proc = subprocess.Popen(self.ns.command(["Orthanc", str(config_path)]),
                                     env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: httpx.get(f"{self.url}/system", timeout=1,
                                   auth=self.auth).status_code == 200,
                 timeout, what="Orthanc HTTP")

    @property
    def auth(self) -> tuple[str, str] | None:
        """The first registered user, when ``extra_config`` turns authentication on."""
        users = self.extra_config.get("RegisteredUsers") or {}
        if not self.extra_config.get("AuthenticationEnabled") or not users:
            return None
        return next(iter(users.items()))

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=60, auth=self.auth, **kwargs)

    def instances(self) -> list[str]:
        return self.get("/instances").json()

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file").content

    def stop(self) -> None:
        """kill -9, not SIGTERM: Orthanc 1.10's own stop took 3.4 s, idle (it sees the signal
        within 0.2 s, then civetweb's 2 s poll quantum, DCMTK's 1 s accept timeout, the jobs
        engine), paid at every module's end and by every test that takes an archive down.
        Nothing a test reads needs it: the ports close at once either way, a stored instance
        is on disk and its row in Orthanc's SQLite index committed before Orthanc answers the
        store, and SQLite keeps committed rows through a killed process."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.owns_ns:
            self.ns.delete()


@contextlib.contextmanager
def running(peer: Any) -> Iterator[Any]:
    try:
        yield peer.start()
    finally:
        peer.stop()


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def prefetch_requests(pas: PasProcess) -> list[dict[str, Any]]:
    """The prefetch requests, newest first, read straight from the appliance's SQLite file
    (read-only; fast enough to poll, where ``pas prefetch list`` costs a process start)."""
    uri = f"file:{pas.home / 'pas.sqlite'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM prefetch_requests ORDER BY id DESC").fetchall()
    return [dict(row) for row in rows]


def read_rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Rows of a database another process writes, opened read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def audit_rows(home: Path, event: str) -> list[dict[str, Any]]:
    """A PAS home's audit rows of one event (``retrieve``, ``query``...), oldest first."""
    return [dict(row) for row in read_rows(
        home / "pas.sqlite", "SELECT * FROM audit WHERE event = ? ORDER BY id", (event,))]


def next_audit_row(home: Path, event: str, before: int) -> dict[str, Any]:
    """The one audit row of ``event`` after the ``before`` already there. A retrieve's is
    written as its handler ends, which may be just after the viewer has its final response
    (or, for a move pynetdicom refused, just after movescu has its answer): awaited."""
    rows = wait_for(lambda: (r := audit_rows(home, event)) and len(r) > before and r, 10,
                    what=f"the {event}'s audit row")
    assert len(rows) == before + 1, rows[before:]
    return rows[-1]


class RetrieveAudit:
    """For a test's site around one ``pas`` (a :class:`PasProcess`): its retrieve audit
    rows, and the row of the retrieve just made."""

    pas: PasProcess

    def retrieves(self) -> list[dict[str, Any]]:
        return audit_rows(self.pas.home, "retrieve")

    def next_retrieve(self, before: int) -> dict[str, Any]:
        return next_audit_row(self.pas.home, "retrieve", before)


def pas_holding_real_sets(home: Path) -> PasProcess:
    """A started PAS holding the CT and MR sets (the serving tests' module fixtures). Without
    the spool's fsync: they test what is served, not how it was stored (that has its own
    tests), and the 582 fsyncs were a second of each module's set-up."""
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                            "PAS_PREFETCH__ENABLED": "false",
                            "PAS_STORAGE__FSYNC": "false"}).start()
    try:
        storescu(CT_DIR, pas.port)
        storescu(MR_DIR, pas.port)
    except BaseException:
        pas.stop()
        raise
    return pas


def pas_with_hl7(home: Path, **env: str) -> PasProcess:
    """A started PAS whose HL7 listener is up, prefetching from an address where nothing
    listens (``env`` adds to or overrides those keys)."""
    pas = PasProcess(home, {
        "PAS_PREFETCH__DICOMWEB_URL": f"http://127.0.0.1:{free_port()}/dicom-web",
        "PAS_PREFETCH__RETRY_AFTER_S": "3600",
        **env,
    })
    pas.start()  # on a new HL7 port if another test's server took the first one
    try:
        # Its own listener, logged before "PAS ready": an open port alone may be another
        # test's server's (a CI run sent its order to one, and read HTTP's 400 back).
        assert f"HL7 MLLP listener on 127.0.0.1:{pas.hl7_port}" in pas.log(), pas.log()[-2000:]
    except BaseException:
        pas.stop()  # the caller never gets it to stop
        raise
    return pas


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """Closed by the server within ``within_s``: an end of stream, a reset (a close with
    the request's bytes unread sends one) or, over TLS, the connection's end as an SSL
    error."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
