"""A manifest's JSON read and hashed a piece at a time, so that the hub's event loop keeps
serving while a large one is processed in a worker thread.

Why: moving the work to a thread is not enough by itself. ``json.loads`` and ``json.dumps``
are single C calls that hold the GIL from start to end; for a 100,000-instance manifest
(20 MB) each held it 0.1-0.25 s, during which the event loop (every other site's requests)
could not run. Here the top-level object's lists (the manifest's ``instances``) are read and
written an element or a slice at a time, with the GIL free for the loop between the pieces.
The results are exactly those of the one call: the same objects, the same canonical bytes,
and on any doubt (a body that is not such an object, an error) the one call itself, for its
exact result or error.

Owns: :func:`loads`, :func:`canonical_sha256`. May not touch: anything else (pure functions).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from json.decoder import scanstring
from typing import Any

PIECE = 1000  # list elements written per json.dumps call (about 1 ms each for instances)
_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_SEPARATORS = (",", ":")


class _NotPlain(ValueError):
    """Not read here: the one ``json.loads`` call reads it (or names its error)."""


def loads(document: str | bytes | bytearray) -> Any:
    """``json.loads(document)``: the same value, or the same error (ValueError, or
    RecursionError for a value nested too deeply), a top-level object's lists read an
    element at a time."""
    text: str
    if isinstance(document, bytes | bytearray):
        if json.detect_encoding(document) != "utf-8":
            return json.loads(document)
        try:
            text = bytes(document).decode("utf-8")
        except UnicodeDecodeError:
            return json.loads(document)
    else:
        text = document
    try:
        return _object(text)
    except (_NotPlain, ValueError, IndexError):
        return json.loads(document)


def _skip(text: str, at: int) -> int:
    match = _WHITESPACE.match(text, at)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _object(text: str) -> dict[str, Any]:
    at = _skip(text, 0)
    if text[at:at + 1] != "{":
        raise _NotPlain("not an object")
    result: dict[str, Any] = {}
    at = _skip(text, at + 1)
    if text[at] == "}":
        at += 1
    else:
        while True:
            if text[at] != '"':
                raise _NotPlain("a key")
            key, at = scanstring(text, at + 1)
            at = _skip(text, at)
            if text[at] != ":":
                raise _NotPlain("a colon")
            at = _skip(text, at + 1)
            if text[at] == "[":
                value, at = _array(text, at)
            else:
                value, at = _DECODER.raw_decode(text, at)
            result[key] = value
            at = _skip(text, at)
            if text[at] == ",":
                at = _skip(text, at + 1)
                continue
            if text[at] != "}":
                raise _NotPlain("a comma or the end")
            at += 1
            break
    if _skip(text, at) != len(text):
        raise _NotPlain("extra data")
    return result


def _array(text: str, at: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    at = _skip(text, at + 1)
    if text[at] == "]":
        return items, at + 1
    while True:
        value, at = _DECODER.raw_decode(text, at)
        items.append(value)
        at = _skip(text, at)
        if text[at] == ",":
            at = _skip(text, at + 1)
            continue
        if text[at] != "]":
            raise _NotPlain("a comma or the end of a list")
        return items, at + 1


def canonical_sha256(document: Any) -> str:
    """``sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode())``,
    the text written a piece at a time (a top-level object's long lists by slices)."""
    digest = hashlib.sha256()
    for piece in _canonical(document):
        digest.update(piece.encode())
    return digest.hexdigest()


def _canonical(document: Any) -> Iterator[str]:
    if not isinstance(document, dict) or not all(isinstance(k, str) for k in document):
        yield json.dumps(document, sort_keys=True, separators=_SEPARATORS)
        return
    yield "{"
    for number, key in enumerate(sorted(document)):
        yield ("," if number else "") + json.dumps(key) + ":"
        value = document[key]
        if isinstance(value, list) and len(value) > PIECE:
            yield "["
            for start in range(0, len(value), PIECE):
                inner = json.dumps(value[start:start + PIECE], sort_keys=True,
                                   separators=_SEPARATORS)[1:-1]
                yield ("," if start else "") + inner
            yield "]"
        else:
            yield json.dumps(value, sort_keys=True, separators=_SEPARATORS)
    yield "}"
