"""A warm ``pas`` for the tests: one interpreter per test worker that has imported what
``pas`` imports, and forks a child for each ``pas`` command instead of starting a new one.

Why: a run of the suite starts about 1,200 ``pas`` processes (750 CLI calls, 380 ``pas run``,
90 ``pas hub run``), and a new interpreter spends most of its start importing pydicom (and
numpy through it), pynetdicom, pydantic, httpx, cryptography: 0.3 CPU-s for a CLI call, 0.8
for a daemon. On the 2-core machine that was more than a third of the suite's CPU.

What the child runs is what the console script ``.venv/bin/pas`` runs: ``sys.exit(main())``
of ``appliance.cli.main``, with the command's own argv, environment, working directory and
standard streams (passed as file descriptors), so it exits, logs and answers signals as the
real command does (its end is :func:`_exit_as_sys_exit`: that of ``sys.exit`` without the
interpreter's teardown). The command-line modules themselves (``appliance.cli.*``) are imported by
the child, not ahead: they read the terminal and the environment when imported (rich's
consoles), which must be the command's, not the warm interpreter's.

Only the test suite forks (tests/conftest.py sets :data:`ENABLED`): the benchmarks in
``bench/`` use the same ``PasProcess`` and measure ``pas`` as the appliance runs it, a new
interpreter.

What is not the same, and where the tests keep a real ``exec``:

- ``/proc/PID/cmdline`` and ``environ`` show the warm interpreter's (``comm`` is set to
  ``pas``): a test that looks for processes by them (tests/test_support_fixtures.py) sets
  ``PAS_TEST_EXEC=1``.
- Every child has the same hash seed (set and dict order of strings repeat between runs).
- A command run under a launcher (``ip netns exec``, ``prlimit``), the systemd unit, the image,
  ``make demo`` and the direct ``subprocess`` calls of tests about the binary itself are
  real ``exec``\\ s, as is a command whose environment sets a ``PYTHON*`` variable
  differently (read once, at an interpreter's start), and everything when
  ``PAS_TEST_EXEC=1`` is set.

The protocol: a Unix SOCK_SEQPACKET socket. A request is one message (JSON: argv, env, cwd)
carrying three descriptors (stdin, stdout, stderr). The answer is ``{"pid": N}`` at once and
``{"returncode": N}`` (``-signal`` when killed by one, as :class:`subprocess.Popen` says)
when the child ends; the warm interpreter reaps its children through pidfds. When the worker
goes (its end of the warm interpreter's stdin closes), the children are killed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PAS_BIN = Path(sys.executable).parent / "pas"
MAX_MESSAGE = 1 << 20
# Set by tests/conftest.py: the suite forks, the benchmarks (which share tests/support) exec.
ENABLED = False

# What a daemon and the commands import, ahead. Not appliance.cli: see the module docstring.
WARM_IMPORTS = (
    "appliance.daemon", "appliance.hub.app", "appliance.config", "appliance.store",
    "appliance.ops", "appliance.serving", "appliance.prefetch", "appliance.transfer",
    "appliance.dispatch", "appliance.ingest", "appliance.routing", "appliance.web",
    "typer", "rich.console", "rich.table", "httpx", "cryptography.x509", "pynetdicom",
    "pydicom", "uvicorn", "sqlite3",
    # What typer.rich_utils imports to render a --help or a usage error (rich.markdown and
    # markdown_it: 45 ms of a 120 ms ``pas status --help``), not typer.rich_utils itself:
    # it reads the environment (TERMINAL_WIDTH, FORCE_COLOR...) when imported.
    "rich.markdown", "rich.traceback", "rich.panel", "rich.columns", "rich.align",
    "rich.emoji", "rich.padding", "rich.theme", "rich.highlighter", "rich.box",
)


# --- the warm interpreter ----------------------------------------------------------------


def _import_ahead() -> None:
    import importlib
    import pkgutil

    for name in WARM_IMPORTS:
        module = importlib.import_module(name)
        if name.startswith("appliance.") and hasattr(module, "__path__"):
            for info in pkgutil.walk_packages(module.__path__, name + "."):
                if not info.name.startswith("appliance.cli"):
                    importlib.import_module(info.name)
    if threading.active_count() != 1:  # a fork keeps only the forking thread
        raise RuntimeError(f"importing ahead started threads: {threading.enumerate()}")


def _serve(listener: socket.socket) -> list[str]:
    """Answer requests until one is a child's: in the child, return its argv (the caller
    then runs the command); in the warm interpreter, never return (exit when the worker
    goes)."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, ("listener", None))
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, ("worker", None))
    children: dict[int, tuple[int, socket.socket]] = {}  # pid -> (pidfd, connection)
    while True:
        for key, _ in selector.select():
            kind, data = key.data
            if kind == "worker":  # the worker ended: its children end with it
                for pid in children:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                os._exit(0)
            if kind == "exited":
                pid = data
                pidfd, connection = children.pop(pid)
                selector.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    connection.send(json.dumps(
                        {"returncode": os.waitstatus_to_exitcode(status)}).encode())
                connection.close()
                continue
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, MAX_MESSAGE, 3)
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                selector.close()
                listener.close()
                connection.close()
                for pidfd, other in children.values():
                    os.close(pidfd)
                    other.close()
                _become(request, fds)
                return [str(PAS_BIN), *request["argv"]]
            for fd in fds:
                os.close(fd)
            pidfd = os.pidfd_open(pid)
            children[pid] = (pidfd, connection)
            selector.register(pidfd, selectors.EVENT_READ, ("exited", pid))
            connection.send(json.dumps({"pid": pid}).encode())


def _become(request: dict[str, Any], fds: list[int]) -> None:
    """In the child: the command's streams, directory and environment, as exec gives them."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    if request.get("cwd"):
        os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # Its name in /proc/PID/comm, which pas doctor reads, is the script's as exec gives it.
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(15, PAS_BIN.name.encode(), 0, 0, 0)  # PR_SET_NAME


def _warm_main(socket_name: str) -> None:
    _import_ahead()
    import gc

    gc.collect()
    gc.freeze()  # the imported objects stay shared: the collector does not touch their pages
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind("\0" + socket_name)
    listener.listen(64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.argv = _serve(listener)
    # From here on this is the child, and runs what the console script runs: its imports
    # are found first where the script's are (its own folder), not in the working directory.
    # (The imported objects stay frozen: never collected, as most of them never would be.)
    sys.path[0] = str(PAS_BIN.parent)
    from appliance.cli.main import main

    _exit_as_sys_exit(main)


def _exit_as_sys_exit(main: Any) -> None:
    """End as ``sys.exit(main())`` ends an interpreter, in the order CPython does: its
    non-daemon threads awaited, the atexit handlers run (logging's flush among them), the
    standard streams flushed, the same exit status; then ``os._exit``. What is left out is
    the teardown of every module: in a child of the warm interpreter it touched the pages of
    all the objects imported ahead, each then copied (copy-on-write): half of a CLI call's
    CPU (0.127 s a call with it, 0.068 s without, measured)."""
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # as the interpreter: the traceback on stderr, status 1
        import traceback

        traceback.print_exc()
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx waits for
    atexit._run_exitfuncs()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): said on stderr, status 1
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status & 0xFF)


# --- the tests' side ---------------------------------------------------------------------


class ForkedProcess:
    """A ``pas`` child of the warm interpreter, with the part of :class:`subprocess.Popen`
    the tests use: ``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``,
    ``terminate``, ``kill``."""

    def __init__(self, args: list[str], connection: socket.socket):
        self.args = args
        self._connection = connection
        self._lock = threading.Lock()
        self.returncode: int | None = None
        self.pid: int = json.loads(connection.recv(MAX_MESSAGE))["pid"]

    def _read_end(self, timeout: float | None) -> int | None:
        with self._lock:
            if self.returncode is None:
                self._connection.settimeout(timeout)
                try:
                    message = self._connection.recv(MAX_MESSAGE)
                except (TimeoutError, BlockingIOError):
                    return None
                if not message:
                    raise RuntimeError(f"the warm interpreter went before pid {self.pid}")
                self.returncode = json.loads(message)["returncode"]
                self._connection.close()
            return self.returncode

    def poll(self) -> int | None:
        return self._read_end(0)

    def wait(self, timeout: float | None = None) -> int:
        returncode = self._read_end(timeout)
        if returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Warm:
    """This worker's warm interpreter, started at its first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        # An abstract Unix address (Linux): nothing in the file system to clean up.
        self.socket_name = f"pas-warm-{os.getpid()}-{os.urandom(4).hex()}"
        self.startup_variables: dict[str, str] | None = None

    def ensure(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            self.startup_variables = _startup_variables(os.environ)
            self._proc = subprocess.Popen(
                [sys.executable, "-c",
                 "import sys; from tests.support.zygote import _warm_main; _warm_main(sys.argv[1])",
                 self.socket_name],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
            assert self._proc.stdout is not None
            line = self._proc.stdout.readline()
            if line != b"ready\n":
                raise RuntimeError(f"the warm interpreter did not start: {line!r}")
            atexit.register(self.close)

    def close(self) -> None:
        """At the worker's end: the warm interpreter goes (and kills what it still runs)."""
        if self._proc is not None and self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait(30)


_warm = _Warm()


def _startup_variables(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """What an interpreter reads once, when it starts (PYTHONPATH and its sitecustomize,
    PYTHONHASHSEED, PYTHONWARNINGS, ...)."""
    return {key: value for key, value in env.items() if key.startswith("PYTHON")}


def suits(env: dict[str, str]) -> bool:
    """Whether a command with this environment may be forked from the warm interpreter: not
    outside the test suite (:data:`ENABLED`), nor when ``PAS_TEST_EXEC=1``, nor when it sets
    what only a new interpreter reads (a test's PYTHONPATH with a ``sitecustomize`` patching
    the hub, tests/test_uplink_holdings.py)."""
    if not ENABLED or os.environ.get("PAS_TEST_EXEC", "") in ("1", "true"):
        return False
    return _startup_variables(env) == (_warm.startup_variables
                                       or _startup_variables(os.environ))


def spawn(args: list[str], env: dict[str, str], cwd: Path | str | None = None,
          stdin: int = 0, stdout: int = 1, stderr: int = 2) -> ForkedProcess:
    """``pas ARGS`` forked from the warm interpreter (``args`` without the program)."""
    _warm.ensure()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connection.connect("\0" + _warm.socket_name)
    request = {"argv": list(args), "env": dict(env), "cwd": str(cwd) if cwd else None}
    socket.send_fds(connection, [json.dumps(request).encode()], [stdin, stdout, stderr])
    return ForkedProcess([str(PAS_BIN), *args], connection)


def run(args: list[str], env: dict[str, str], timeout: float,
        cwd: Path | str | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:  # noqa: A002
    """:func:`subprocess.run` of ``pas ARGS`` with its output captured as text, and
    ``input`` (as there) written to its standard input, then closed. As there, the child is
    killed when the wait runs out or is interrupted (a test's timeout)."""
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    open_fds = {out_read, err_read}
    in_read, in_write = os.pipe() if input is not None else (0, -1)
    try:
        try:
            proc = spawn(args, env, cwd, stdin=in_read, stdout=out_write, stderr=err_write)
        except BaseException:
            if input is not None:
                os.close(in_write)  # no command to write it to
            raise
        finally:
            os.close(out_write)
            os.close(err_write)
            if input is not None:
                os.close(in_read)
        if input is not None:
            # In a thread: an input larger than the pipe holds would wait for the command.
            threading.Thread(target=_write_and_close, args=(in_write, input.encode()),
                             daemon=True).start()
        try:
            chunks = _read_until_closed(open_fds, time.monotonic() + timeout)
            returncode = proc.wait(timeout)
        except BaseException as exc:
            proc.kill()
            proc.wait()
            if isinstance(exc, TimeoutError):
                raise subprocess.TimeoutExpired(proc.args, timeout) from None
            raise
    finally:
        for fd in open_fds:
            os.close(fd)

    def text(fd: int) -> str:
        return b"".join(chunks[fd]).decode().replace("\r\n", "\n").replace("\r", "\n")

    return subprocess.CompletedProcess(proc.args, returncode, text(out_read), text(err_read))


def _write_and_close(fd: int, data: bytes) -> None:
    try:
        with contextlib.suppress(BrokenPipeError):  # the command did not read it all
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _read_until_closed(open_fds: set[int], deadline: float) -> dict[int, list[bytes]]:
    """What the pipes in ``open_fds`` carry until each is closed at the other end (each
    closed here then, and taken out of the set); TimeoutError past ``deadline``."""
    chunks: dict[int, list[bytes]] = {fd: [] for fd in open_fds}
    with selectors.DefaultSelector() as selector:
        for fd in open_fds:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            for key, _ in selector.select(left):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    selector.unregister(key.fd)
                    open_fds.discard(key.fd)
                    os.close(key.fd)
    return chunks
