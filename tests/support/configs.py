"""Configuration files the tests and benchmarks write: one shape, written once.

Why: "every study to one DICOM node" (the fallback rule and a ``dicom`` destination named
``pacs``) is the set-up of the forwarding, transcoding and link tests and of
``bench/forward.py``; each wrote the same TOML by hand."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Protocol


class _Node(Protocol):
    ae_title: str
    port: int


def quick_retries(max_attempts: int) -> str:
    """A ``[queue]`` section for ``everything_to``'s ``before``: ``max_attempts`` attempts,
    0.2 s to 0.5 s apart, so a test sees a job retried, or failed, within seconds."""
    return (f"[queue]\nmax_attempts = {max_attempts}\nbackoff_initial_s = 0.2\n"
            "backoff_max_s = 0.5\n")


def everything_to(path: Path, node: _Node, *, timeout_s: float = 30,
                  before: str = "") -> Path:
    """Write at ``path`` a configuration routing every study (the fallback rule) to the DICOM
    node ``node`` (a StoreSCP) on 127.0.0.1, as destination ``pacs``; ``before``: more TOML
    put first (a ``[queue]`` section). Returns ``path``."""
    path.write_text(textwrap.dedent(before) + textwrap.dedent(f"""
        [routing.fallback]
        destinations = ["pacs"]

        [destinations.pacs]
        kind = "dicom"
        ae_title = "{node.ae_title}"
        host = "127.0.0.1"
        port = {node.port}
        timeout_s = {timeout_s:g}
        """))
    return path


# ``ct1_to``'s ``queue`` for a test that sees a job retried within a second.
BACKOFF_QUICK = "backoff_initial_s = 0.2\nbackoff_max_s = 0.5\n"


def ct1_to(path: Path, node: _Node, *, queue: str = "", timeout_s: float | None = None
           ) -> Path:
    """Write at ``path`` a configuration sending what AE ``CT1`` sends (one rule, "CT to
    PACS") to the DICOM node ``node`` on 127.0.0.1, as destination ``pacs``; what other AEs
    send (a QA workstation's correction) goes nowhere. ``queue``: the ``[queue]`` keys, one
    a line, ``poll_interval_s = 0.1`` always among them. Returns ``path``."""
    timeout = "" if timeout_s is None else f"timeout_s = {timeout_s:g}\n"
    path.write_text("[queue]\npoll_interval_s = 0.1\n" + textwrap.dedent(queue)
                    + textwrap.dedent(f"""
        [[routing.rules]]
        name = "CT to PACS"
        match = {{ calling_ae = "^CT1$" }}
        destinations = ["pacs"]

        [destinations.pacs]
        kind = "dicom"
        ae_title = "{node.ae_title}"
        host = "127.0.0.1"
        port = {node.port}
        """) + timeout)
    return path
