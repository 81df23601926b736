"""Run one ``pas`` command in this process and SIGKILL it at a chosen point of its code.

``python -m tests.faults.crash_at MODULE ATTRIBUTE WHEN pas-args...``: the function
``MODULE.ATTRIBUTE`` is replaced, in this process only, by one that kills the process with
SIGKILL (nothing flushed, no ``finally``, no ``atexit``: as ``kill -9`` or a power cut leave
it, bar the page cache) ``before`` calling the real function, or ``after`` it returned; then
the ``pas`` command runs as the ``pas`` entry point runs it. ``WHEN`` may also be
``before-aside-unlink``, for ``os.unlink``: the kill comes when an eviction unlinks a file it
renamed aside (``<name>.dcm.evicting-<pid>``), and only then.

Why here, in the test tree, rather than a crash hook read from the environment in the
product: the points are the functions' own boundaries, which the code under test cannot
skip or move without the test noticing (the patched name must exist: a missing one is an
error, not a pass), and nothing in ``appliance`` carries a test switch.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

WHENS = ("before", "after", "before-aside-unlink")


def crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crashing(real: Callable[..., Any], when: str) -> Callable[..., Any]:
    def patched(*args: Any, **kwargs: Any) -> Any:
        if when == "before-aside-unlink":
            if args and ".evicting-" in os.fspath(args[0]):
                crash()
            return real(*args, **kwargs)
        if when == "before":
            crash()
        result = real(*args, **kwargs)
        crash()
        return result  # not reached

    return patched


def main(argv: list[str]) -> None:
    module_name, attribute, when, *pas_args = argv
    if when not in WHENS:
        raise SystemExit(f"WHEN must be one of {WHENS}, not {when!r}")
    module = importlib.import_module(module_name)
    setattr(module, attribute, crashing(getattr(module, attribute), when))
    sys.argv = ["pas", *pas_args]
    from appliance.cli.main import main as pas_main

    pas_main()


if __name__ == "__main__":
    main(sys.argv[1:])
