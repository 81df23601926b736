"""Where ``pas enroll`` takes its one-time token from, against a real ``pas hub run``.

``--token TOKEN`` put the secret in the appliance's process list (``ps``,
/proc/PID/cmdline: every local user reads it while the command runs) and in the shell's
history. The token now also comes from standard input (``--token -``), a file only its
owner reads (``--token-file``, refused otherwise, as keys are), ``$PAS_ENROLL_TOKEN``, or a
prompt that does not echo it; ``--token TOKEN`` still works and says it was visible.
"""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import termios
from pathlib import Path

import pytest

from appliance.ops.security import SecretFileError, read_secret_file
from appliance.transfer.enrolment import load_enrolment
from tests.support.hub import HubProcess
from tests.support.peers import PAS_BIN, run_pas

VISIBLE = "visible to other users of this host"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PAS_CONFIG", "PAS_ENROLL_TOKEN")}
    return {**env, "PAS_HOME": str(home), **extra}


def _pas_enroll(home: Path, hub: HubProcess, *args: str, stdin: str | None = None,
                **env: str) -> subprocess.CompletedProcess[str]:
    # No input given: an empty one (not a terminal, at its end at once), as /dev/null was.
    return run_pas(["enroll", "--hub", hub.url, *args], _env(home, **env),
                   input="" if stdin is None else stdin, timeout=60)


def _enrolled_as(home: Path, site: str, result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"enrolled as site {site}" in result.stdout
    enrolment = load_enrolment(home)
    assert enrolment is not None and enrolment.site == site
    assert VISIBLE not in result.stderr, result.stderr


def test_the_token_from_standard_input_or_the_environment_enrols(
        hub: HubProcess, tmp_path: Path) -> None:
    """``--token -`` reads the first line of standard input (``pas hub token SITE 2>&1``
    gives two); ``$PAS_ENROLL_TOKEN`` is read when no option names the token."""
    token = hub.token("STDIN")
    result = _pas_enroll(tmp_path / "stdin", hub, "--token", "-",
                         stdin=f"{token}\nidentifier ... valid until ...\n")
    _enrolled_as(tmp_path / "stdin", "STDIN", result)

    token = hub.token("ENVIRON")
    result = _pas_enroll(tmp_path / "env", hub, PAS_ENROLL_TOKEN=token)
    _enrolled_as(tmp_path / "env", "ENVIRON", result)


def test_a_token_file_others_can_read_is_refused_and_nothing_is_spent(
        hub: HubProcess, tmp_path: Path) -> None:
    """A token file with group or other permissions is refused naming the file, its mode
    and the fix, before the hub is asked: nothing is written, the token is not spent, and
    the same file once 0600 enrols."""
    token = hub.token("TOKENFILE")
    path = tmp_path / "site.token"
    path.write_text(f"{token}\n")
    path.chmod(0o640)
    home = tmp_path / "site"
    refused = _pas_enroll(home, hub, "--token-file", str(path))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (f"enrolment not attempted: --token-file {path}: permissions -rw-r----- let "
            f"others read it; run `chmod 600 {path}`") in refused.stderr
    assert token not in refused.stderr + refused.stdout
    assert load_enrolment(home) is None and not (home / "pki").exists()
    assert "TOKENFILE" not in hub.log()  # the hub never heard of it

    path.chmod(0o600)
    _enrolled_as(home, "TOKENFILE", _pas_enroll(home, hub, "--token-file", str(path)))


def test_no_token_without_a_terminal_is_refused_naming_the_ways(tmp_path: Path,
                                                                 hub: HubProcess) -> None:
    """Standard input not a terminal, no option, no variable: one line saying where the
    token may come from (no prompt that nobody can answer, no wait)."""
    home = tmp_path / "site"
    refused = _pas_enroll(home, hub)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "enrolment not attempted: no token: give --token-file FILE (0600), --token - " \
           "(standard input) or PAS_ENROLL_TOKEN" in refused.stderr
    assert load_enrolment(home) is None


def test_the_token_on_the_command_line_still_enrols_and_warns(hub: HubProcess,
                                                                tmp_path: Path) -> None:
    home = tmp_path / "site"
    result = _pas_enroll(home, hub, "--token", hub.token("ARGV"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert load_enrolment(home) is not None
    assert f"warning: the token given with --token is {VISIBLE}" in result.stderr
    assert "--token - (standard input)" in result.stderr


def test_at_a_terminal_the_token_is_asked_for_and_not_echoed(hub: HubProcess,
                                                             tmp_path: Path) -> None:
    """No option at a terminal (a pseudo-terminal here, the process's controlling one):
    a prompt, the token typed after it is not echoed back, and it enrols."""
    token = hub.token("PROMPT")
    home = tmp_path / "site"
    master, slave = os.openpty()

    def controlling_terminal() -> None:  # after setsid: the pty becomes /dev/tty
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        process = subprocess.Popen(
            [str(PAS_BIN), "enroll", "--hub", hub.url], env=_env(home), stdin=slave,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True, preexec_fn=controlling_terminal)
        os.close(slave)
        shown = _read_terminal(master, until=b"not shown): ")  # echo off, then the prompt
        if b"not shown): " not in shown:
            process.kill()
            stdout, stderr = process.communicate(timeout=60)
            pytest.fail(f"no prompt at the terminal: {shown!r} {stdout + stderr}")
        os.write(master, f"{token}\n".encode())
        stdout, stderr = process.communicate(timeout=60)
        shown += _read_terminal(master)
    finally:
        os.close(master)
    assert process.returncode == 0, stdout + stderr
    assert b"Enrolment token" in shown and token.encode() not in shown
    enrolment = load_enrolment(home)
    assert enrolment is not None and enrolment.site == "PROMPT"


def test_only_a_small_regular_file_of_its_owner_is_read_as_a_secret(tmp_path: Path) -> None:
    """In-process: what ``--token-file`` accepts. A directory (fdopen raised
    IsADirectoryError, a traceback, before the check), a FIFO (opening it would wait for a
    writer), a file over the limit and one others may read are each refused in one line
    that names the file and never shows its content."""
    fifo, big, shared, good = (tmp_path / n for n in ("fifo", "big", "shared", "good"))
    os.mkfifo(fifo, 0o600)
    for path, text, mode in ((big, "B" * 5000, 0o600), (shared, "SECRET-S", 0o604),
                             (good, "SECRET-G\n", 0o600)):
        path.write_text(text)
        path.chmod(mode)
    for path, problem in ((tmp_path, "not a regular file"), (fifo, "not a regular file"),
                          (big, "over 4096 bytes"), (shared, "permissions -rw----r-- let "
                                                            "others read it"),
                          (tmp_path / "missing", "file not found")):
        with pytest.raises(SecretFileError) as refused:
            read_secret_file(path, "--token-file", 4096)
        assert str(refused.value).startswith(f"--token-file {path}: {problem}")
        assert "SECRET" not in str(refused.value) and "BBBB" not in str(refused.value)
    assert read_secret_file(good, "--token-file", 4096) == b"SECRET-G\n"


def _read_terminal(master: int, until: bytes | None = None) -> bytes:
    """What the terminal showed: until ``until`` appears (at most 60 s), or what is there
    now; the end of the child's side (EIO) ends it too."""
    shown = b""
    while until is None or until not in shown:
        readable, _, _ = select.select([master], [], [], 60 if until else 0)
        if not readable:
            break
        try:
            shown += os.read(master, 4096)
        except OSError:  # EIO: every process on the terminal's side closed it
            break
    return shown
