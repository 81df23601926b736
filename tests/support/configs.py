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


def _quick_queue(queue: str) -> str:
    """A ``[queue]`` section polled every 0.1 s, with ``queue``'s keys (one a line)."""
    return "[queue]\npoll_interval_s = 0.1\n" + textwrap.dedent(queue)


def _ct_rule_to(match: str, name: str, ae_title: str, port: int) -> str:
    """One rule, "CT to PACS", sending what ``match`` matches to the DICOM node
    ``ae_title`` on 127.0.0.1:``port``, as destination ``name``."""
    return textwrap.dedent(f"""
        [[routing.rules]]
        name = "CT to PACS"
        match = {{ {match} }}
        destinations = ["{name}"]

        [destinations.{name}]
        kind = "dicom"
        ae_title = "{ae_title}"
        host = "127.0.0.1"
        port = {port}
        """)


def ct1_to(path: Path, node: _Node, *, queue: str = "", timeout_s: float | None = None
           ) -> Path:
    """Write at ``path`` a configuration sending what AE ``CT1`` sends (one rule, "CT to
    PACS") to the DICOM node ``node`` on 127.0.0.1, as destination ``pacs``; what other AEs
    send (a QA workstation's correction) goes nowhere. ``queue``: the ``[queue]`` keys, one
    a line, ``poll_interval_s = 0.1`` always among them. Returns ``path``."""
    timeout = "" if timeout_s is None else f"timeout_s = {timeout_s:g}\n"
    path.write_text(_quick_queue(queue) + _ct_rule_to('calling_ae = "^CT1$"', "pacs",
                                                      node.ae_title, node.port) + timeout)
    return path


def ct_to_named(path: Path, name: str, port: int, *, queue: str = "") -> Path:
    """Write at ``path`` a configuration sending every CT (one rule, "CT to PACS") to the
    DICOM node ``PACS`` on 127.0.0.1:``port``, as the destination called ``name``: written
    again with another ``name``, the queued jobs name a destination it no longer has.
    ``queue``: the ``[queue]`` keys, one a line, ``poll_interval_s = 0.1`` always among
    them. Returns ``path``."""
    path.write_text(_quick_queue(queue) + _ct_rule_to('modality = "^CT$"', name, "PACS", port))
    return path


def everything_to_stowrs(path: Path, url: str, *, queue: str = "") -> Path:
    """Write at ``path`` a configuration routing every study (the fallback rule) to the
    STOW-RS archive at ``url``, as destination ``archive``. ``queue``: the ``[queue]`` keys,
    one a line, ``poll_interval_s = 0.1`` always among them. Returns ``path``."""
    path.write_text(_quick_queue(queue) + textwrap.dedent(f"""
        [routing.fallback]
        destinations = ["archive"]

        [destinations.archive]
        kind = "stowrs"
        url = "{url}"
        """))
    return path
