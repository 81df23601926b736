"""What every ``pas`` command shares: the consoles and how a configuration error ends it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from appliance.config import ConfigError

T = TypeVar("T")

console = Console()
# Errors stay one line each (no wrapping at the terminal width): greppable in scripts and logs.
err = Console(stderr=True, soft_wrap=True)


def settings_or_exit(load: Callable[[], T]) -> T:
    """Load settings; on a configuration error print every problem and exit with status 2."""
    try:
        return load()
    except ConfigError as exc:
        for problem in exc.problems:
            err.print(f"[red]config error[/red] {problem}", highlight=False)
        raise typer.Exit(2) from None
