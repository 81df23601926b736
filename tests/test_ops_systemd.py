"""The shipped systemd units (verify, security exposure) and the daemon's sd_notify messages
received on a real unix datagram NOTIFY_SOCKET."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.ingest.receive import Receiver
from appliance.ops.notify import Notifier
from appliance.ops.recovery import startup_recovery
from appliance.store.db import Database
from appliance.store.spool import Spool
from tests.support.hub import HubProcess
from tests.support.peers import CT_DIR, PAS_BIN, ROOT, PasProcess, port_open, wait_for

UNITS = ROOT / "image" / "systemd"
SHIPPED = ["pas.service", "pas-hub.service", "pas-backup.service", "pas-hub-backup.service"]
BACKUPS = ["pas-backup.service", "pas-hub-backup.service"]


def _installed_copy(unit: Path, folder: Path, extra: str = "") -> Path:
    """The unit as the image installs it, except that ``/usr/bin/pas`` is this checkout's
    ``pas`` (systemd-analyze verify checks that the executable exists)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / unit.name
    target.write_text(unit.read_text().replace("/usr/bin/pas", str(PAS_BIN)) + extra)
    return target


@pytest.mark.parametrize("name", SHIPPED)
def test_unit_verifies_clean(name: str, tmp_path: Path) -> None:
    unit = _installed_copy(UNITS / name, tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def _exposure(unit: Path) -> float:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("name", SHIPPED)
def test_unit_exposure_at_most_2(name: str, tmp_path: Path) -> None:
    assert _exposure(_installed_copy(UNITS / name, tmp_path)) <= 2.0


def test_port_104_drop_in_keeps_exposure_low(tmp_path: Path) -> None:
    drop_in = (UNITS / "pas.service.d" / "port-104.conf").read_text()
    assert "CAP_NET_BIND_SERVICE" in drop_in
    unit = _installed_copy(UNITS / "pas.service", tmp_path, "\n" + drop_in)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _exposure(unit) <= 2.0


def test_shipped_unit_has_the_required_settings() -> None:
    text = (UNITS / "pas.service").read_text()
    for line in ("Type=notify", "User=pas", "StateDirectory=pas",
                 "Environment=PAS_HOME=/var/lib/pas", "ProtectSystem=strict", "PrivateTmp=yes",
                 "NoNewPrivileges=yes", "SystemCallFilter=@system-service"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^CapabilityBoundingSet=$", text, re.M)
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert re.search(r"^RestrictAddressFamilies=", text, re.M)


@pytest.mark.parametrize("service", BACKUPS)
def test_backup_timer_verifies_and_starts_its_service_daily(service: str,
                                                            tmp_path: Path) -> None:
    timer = UNITS / service.replace(".service", ".timer")
    units = [_installed_copy(UNITS / service, tmp_path), _installed_copy(timer, tmp_path)]
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    text = timer.read_text()
    for line in ("OnCalendar=*-*-* 01:00:00", "Persistent=true", "WantedBy=timers.target"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^RandomizedDelaySec=\S+$", text, re.M)
    assert re.search(r"^Type=oneshot$", (UNITS / service).read_text(), re.M)


def _unit_environment(text: str) -> dict[str, str]:
    return dict(re.findall(r"^Environment=(\w+)=(.*)$", text, re.M))


def test_backup_folders_are_made_private_for_the_services_user() -> None:
    """tmpfiles.d makes each service's default folder, 0700, owned by the user it runs as,
    and the service may write there (ProtectSystem=strict makes /var read-only)."""
    tmpfiles = (UNITS / "pas.tmpfiles.conf").read_text()
    for service in BACKUPS:
        text = (UNITS / service).read_text()
        folder = _unit_environment(text)["BACKUP_FOLDER"]
        user = re.search(r"^User=(\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
        assert re.search(rf"^d {re.escape(folder)} 0700 {user} {user} -$", tmpfiles, re.M)
        assert re.search(rf"^ReadWritePaths=-{re.escape(folder)}$", text, re.M)


def _appliance_home(tmp_path: Path) -> tuple[Path, Path]:
    home = tmp_path / "pas"
    home.mkdir()
    Database(home / "pas.sqlite").close()
    config = tmp_path / "appliance.toml"
    config.write_text('site = "SITE-T"\n')
    return home, config


def _hub_home(tmp_path: Path) -> tuple[Path, Path]:
    home = HubProcess(tmp_path / "hub").init().home
    config = tmp_path / "hub.toml"
    config.write_text("")
    return home, config


def _unit_command(service: str, make_home: Callable[[Path], tuple[Path, Path]],
                  tmp_path: Path) -> tuple[list[str], dict[str, str], Path, Path]:
    """The unit's ExecStart, its ${...} expanded from its Environment= as systemd does, with
    the folders and the configuration moved into tmp_path: (argv, environment, home,
    destination)."""
    text = (UNITS / service).read_text()
    home, config = make_home(tmp_path)
    destination = tmp_path / "backups"
    destination.mkdir()
    environment = _unit_environment(text)
    environment["BACKUP_FOLDER"] = str(destination)
    home_variable = "PAS_HUB_HOME" if "PAS_HUB_HOME" in environment else "PAS_HOME"
    environment[home_variable] = str(home)
    command = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)  # type: ignore[union-attr]
    argv = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: environment[m.group(1)], command))
    assert argv[0] == "/usr/bin/pas" and "--keep" in argv
    argv[0] = str(PAS_BIN)
    argv[argv.index("--config") + 1] = str(config)
    return argv, environment, home, destination


@pytest.mark.parametrize("service,make_home", [("pas-backup.service", _appliance_home),
                                               ("pas-hub-backup.service", _hub_home)])
def test_backup_service_command_line_is_accepted_by_pas(
        service: str, make_home: Callable[[Path], tuple[Path, Path]], tmp_path: Path) -> None:
    """The unit's command line run as the unit runs it: a backup, pruned."""
    argv, environment, _home, destination = _unit_command(service, make_home, tmp_path)
    result = subprocess.run([*argv, "--json"], env={**os.environ, **environment},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    made = json.loads(result.stdout)
    assert Path(made["folder"]).parent == destination
    assert made["pruned"]["keep"] == int(environment["BACKUP_KEEP"]) >= 1
    assert [p.name for p in destination.iterdir()] == [Path(made["folder"]).name]


# What systemd sets for a service its timer started (systemd.exec(5)): INVOCATION_ID for
# every run, TRIGGER_UNIT and the timer's times for a timer's activation.
TIMER_ACTIVATION = {"INVOCATION_ID": "4f1c2a8e9b7d4e0fa1b2c3d4e5f60718",
                    "TRIGGER_TIMER_REALTIME_USEC": "1796432400000000",
                    "TRIGGER_TIMER_MONOTONIC_USEC": "86400000000"}


def _exported_by(home: Path) -> list[str]:
    """The actors of the appliance's export audit rows (one per backup), oldest first."""
    with sqlite3.connect(home / "pas.sqlite") as conn:
        rows = conn.execute("SELECT actor FROM audit WHERE event = 'export' "
                            "ORDER BY id").fetchall()
    conn.close()
    return [row[0] for row in rows]


def test_a_backup_s_actor_is_not_taken_from_variables_its_runner_sets(tmp_path: Path) -> None:
    """The export audit row named the timer (``system:pas-backup.timer``) from systemd's
    variables alone, which anyone can set: ``INVOCATION_ID=1 TRIGGER_UNIT=pas-backup.timer``
    put an operator's action on the nightly timer, and ``LOGNAME`` named any operator. The
    unit now comes from the process's cgroup (a service's, under ``system.slice``: the unit
    test below), the operator from the kernel's login uid, else the effective user."""
    from appliance.cli.common import login_name

    service, timer = "pas-backup.service", "pas-backup.timer"
    argv, environment, home, destination = _unit_command(service, _appliance_home, tmp_path)
    forged = {**os.environ, **environment, **TIMER_ACTIVATION, "TRIGGER_UNIT": timer,
              "LOGNAME": "dr_house", "USER": "dr_house"}
    by_forger = subprocess.run(argv, env=forged, capture_output=True, text=True, timeout=60)
    assert by_forger.returncode == 0, by_forger.stderr
    assert _exported_by(home) == [f"operator:{login_name()}"], by_forger.stderr
    assert login_name() != "dr_house"


def test_the_unit_that_ran_a_command_comes_from_its_cgroup(tmp_path: Path) -> None:
    """``systemctl start pas-backup``: the service, from the process's cgroup under
    system.slice (cgroup v2 and v1 lines); started by its timer, the timer's name
    (``TRIGGER_UNIT``, taken only inside a service's cgroup). A login shell's scope is an
    operator whatever its variables say; a ``TRIGGER_UNIT`` that is no unit name is not
    written into the trail."""
    from appliance.cli.common import operator_actor

    cgroup = tmp_path / "cgroup"
    cgroup.write_text("1:name=systemd:/system.slice/pas-backup.service\n"
                      "0::/system.slice/pas-backup.service\n")
    assert operator_actor({}, cgroup) == "system:pas-backup.service"
    assert operator_actor({"TRIGGER_UNIT": "pas-backup.timer"}, cgroup) == \
        "system:pas-backup.timer"
    assert operator_actor({"TRIGGER_UNIT": "a timer; DROP TABLE"}, cgroup) == \
        "system:pas-backup.service"
    cgroup.write_text("0::/user.slice/user-0.slice/session-3.scope\n")
    assert operator_actor({"INVOCATION_ID": "1", "TRIGGER_UNIT": "pas-backup.timer"},
                          cgroup).startswith("operator:")


def test_the_operator_is_the_login_not_the_user_sudo_switched_to(tmp_path: Path) -> None:
    """``sudo -u pas pas ...`` (as the docs say to run the commands) set LOGNAME to ``pas``:
    every operator's action read ``operator:pas``. The kernel's login uid says who logged
    in (pam_loginuid); unset (a container, a service), the effective user."""
    import pwd

    from appliance.cli.common import login_name

    me = pwd.getpwuid(os.geteuid()).pw_name
    loginuid = tmp_path / "loginuid"
    loginuid.write_text("4294967295")
    assert login_name(loginuid) == me
    other = next(entry for entry in pwd.getpwall() if entry.pw_uid != os.geteuid())
    loginuid.write_text(f"{other.pw_uid}\n")
    assert login_name(loginuid) == f"{other.pw_name} as {me}"
    loginuid.write_text(str(os.geteuid()))
    assert login_name(loginuid) == me


def test_notifier_is_a_no_op_outside_systemd() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval_s is None


def test_notifier_plain_datagram_to_abstract_socket() -> None:
    name = f"pas-test-notify-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        notifier = Notifier(environ={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000"},
                            use_systemd_python=False)
        assert notifier.watchdog_interval_s == 1.5
        assert notifier.ready("idle")
        assert server.recv(4096) == b"READY=1\nSTATUS=idle"
        notifier.close()


class NotifySocket:
    """A real NOTIFY_SOCKET: records each datagram and whether the DICOM port was open when
    it arrived."""

    def __init__(self, path: Path, port_of: Callable[[], int]):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.port_of = port_of
        self.messages: list[tuple[str, bool]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append((data.decode(), port_open("127.0.0.1", self.port_of())))

    def count(self, prefix: str) -> int:
        return sum(1 for text, _ in self.messages if text.startswith(prefix))

    def close(self) -> None:
        self.done.set()
        self.thread.join(2)
        self.sock.close()


def test_daemon_sends_ready_after_port_open_then_watchdog(tmp_path: Path) -> None:
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "WATCHDOG_USEC": "400000"})
    listener = NotifySocket(tmp_path / "notify.sock", lambda: pas.port)
    pas.env["NOTIFY_SOCKET"] = str(listener.path)
    try:
        pas.start()
        wait_for(lambda: listener.count("READY=1") == 1, 20, what="READY=1")
        wait_for(lambda: listener.count("WATCHDOG=1") >= 3, 20, what="three WATCHDOG=1")
        ready = [(text, was_open) for text, was_open in listener.messages
                 if text.startswith("READY=1")]
        assert ready[0][1], "READY=1 arrived before the DICOM port was open"
        first_ready = next(i for i, (t, _) in enumerate(listener.messages)
                           if t.startswith("READY=1"))
        assert all(not t.startswith("WATCHDOG=1") for t, _ in listener.messages[:first_ready])
        assert "STATUS=idle: nothing queued" in ready[0][0]
        pas.stop()
        wait_for(lambda: listener.count("STOPPING=1") == 1, 10, what="STOPPING=1")
    finally:
        pas.stop()
        listener.close()


def test_an_idle_daemon_ends_at_once_on_sigterm(tmp_path: Path) -> None:
    """``systemctl stop`` (or restart) of an idle daemon: the stop begins when SIGTERM arrives
    and no part sleeps through it. The Storage Commitment delivery loop (on by default) slept
    on its own event, up to a second, and the stop joined its thread: every stop took up to
    1 s (0.7 s measured 0.3 s after start, about 0.9 s just after it)."""
    pas = PasProcess(tmp_path / "pas", {"PAS_HTTP__ENABLED": "false"}).start()
    assert pas.proc is not None
    try:
        pas.proc.send_signal(signal.SIGTERM)
        assert pas.proc.wait(10) == 0
    finally:
        pas.stop()
    # The daemon's own stamps, from the signal heard to the end of its stop: what a loaded
    # machine adds to starting and reaping a process is not counted. A sleeping loop held
    # this 0.7-1.0 s; without one it takes a few hundredths.
    took = pas.logged_at("PAS stopped") - pas.logged_at("signal 15: stopping")
    assert took < 0.4, f"the stop took {took:.2f} s after SIGTERM was heard"


def test_sysusers_creates_the_users_the_units_run_as(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        ["systemd-sysusers", "--dry-run", f"--root={tmp_path}", "-"],
        input=(UNITS / "pas.sysusers.conf").read_text(), capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 0, result.stderr
    for name in SHIPPED:
        user = re.search(r"^User=(\S+)$", (UNITS / name).read_text(), re.M)
        assert user, name
        assert f"Creating user '{user.group(1)}'" in result.stdout + result.stderr


def test_status_line_names_each_destination_backlog() -> None:
    from appliance.ops.notify import backlog_status

    assert backlog_status([]) == "idle: nothing queued"
    line = backlog_status([{"destination": "hub", "studies": 3, "oldest_age_s": 42.4},
                           {"destination": "archive", "studies": 1, "oldest_age_s": 7.0}])
    assert line == "backlog hub: 3 studies, oldest 42s; archive: 1 study, oldest 7s"


def test_a_taken_http_port_fails_start_up_without_ready(tmp_path: Path) -> None:
    """The HTTP port (status page, DICOMweb, /metrics) was bound by uvicorn in its own
    thread: when it was taken, uvicorn logged and ended that thread, and the daemon still
    logged "PAS ready" and sent READY=1, serving DICOM with no status page and no metrics.
    Now it fails start-up as a taken DICOM port does: one line naming the port, exit 1, and
    systemd never hears READY."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        pas = PasProcess(tmp_path / "pas")
        pas.http_port = taken.getsockname()[1]
        pas.env["PAS_HTTP__PORT"] = str(pas.http_port)
        listener = NotifySocket(tmp_path / "notify.sock", lambda: pas.port)
        pas.env["NOTIFY_SOCKET"] = str(listener.path)
        pas.home.mkdir(parents=True)
        run = subprocess.Popen([str(PAS_BIN), "run"], env=pas.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=pas.home)
        try:
            # Either outcome ends the wait: the process exits, or systemd would hear READY.
            wait_for(lambda: run.poll() is not None or listener.count("READY=1"), 60,
                     what="pas run to exit or send READY=1")
        finally:
            if run.poll() is None:
                run.terminate()
            stdout, stderr = run.communicate(timeout=30)
            listener.close()
    assert listener.count("READY=1") == 0, stderr[-2000:]
    assert run.returncode == 1, stdout + stderr
    assert f"cannot start: http.port {pas.http_port} on 127.0.0.1" in stderr
    assert "address already in use" in stderr.lower()
    assert "Traceback" not in stderr
    assert "PAS ready" not in stdout + stderr


def _spool_without_index(home: Path, count: int) -> None:
    """``count`` instances in ``home``'s spool and no index (a rebuilt index's start)."""
    db = Database(home / "pas.sqlite")
    receiver = Receiver(db, Spool(home / "spool", fsync=False))
    for path in sorted(CT_DIR.glob("*.dcm"))[:count]:
        receiver.receive_file(path.read_bytes(), source="test")
    db.close()
    for made in home.glob("pas.sqlite*"):
        made.unlink()


def test_a_long_start_up_recovery_keeps_systemd_waiting_and_says_how_far(
        tmp_path: Path) -> None:
    """Start-up recovery adopting a spool (after pas cache rebuild-index: hours for a large
    one) ran past ``TimeoutStartSec`` (120 s): systemd killed the start and began again. The
    daemon now sends ``EXTEND_TIMEOUT_USEC`` with a STATUS saying how far it is, at once and
    every few seconds, before READY=1."""
    home = tmp_path / "pas"
    _spool_without_index(home, 3)
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    listener = NotifySocket(tmp_path / "notify.sock", lambda: pas.port)
    pas.env["NOTIFY_SOCKET"] = str(listener.path)
    try:
        pas.start()
        wait_for(lambda: listener.count("READY=1") == 1, 20, what="READY=1")
        texts = [text for text, _ in listener.messages]
        first_ready = next(i for i, t in enumerate(texts) if t.startswith("READY=1"))
        assert texts[0] == ("EXTEND_TIMEOUT_USEC=60000000\n"
                            "STATUS=start-up recovery: comparing the spool with the index")
        assert all(t.startswith("EXTEND_TIMEOUT_USEC=") for t in texts[:first_ready])
        assert pas.status()["instances"] == 3
        # With an index: its integrity check first (one SQLite call, a long wait asked).
        pas.stop()
        before = len(listener.messages)
        pas.start()
        wait_for(lambda: listener.count("READY=1") == 2, 20, what="READY=1 again")
        assert listener.messages[before][0] == (
            "EXTEND_TIMEOUT_USEC=900000000\n"
            "STATUS=checking the index database (SQLite quick_check)")
    finally:
        pas.stop()
        listener.close()
    # In process, told at every step: how many files compared, how many adopted of how many.
    _spool_without_index(home, 3)
    db = Database(home / "pas.sqlite")
    told: list[str] = []
    report = startup_recovery(db, Spool(home / "spool", fsync=False),
                              Receiver(db, Spool(home / "spool", fsync=False)),
                              progress=told.append, progress_every_s=0)
    db.close()
    assert report.orphans_adopted == 3
    assert told[1] == "start-up recovery: 1 file compared with the index"
    assert told[-3:] == [f"start-up recovery: indexing files without a row, {n} of 3"
                         for n in range(3)]
