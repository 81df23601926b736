"""Reading a request body with a bound (invariant 8): shared by the hub's routes and the
appliance's status page.

Owns: :func:`read_body_limited` and :class:`BodyTooLarge`. May not touch: the routes' answers
(the hub answers its JSON problem, the status page plain text).
"""

from __future__ import annotations

from starlette.requests import Request


class BodyTooLarge(Exception):
    """A request body over its route's limit; the message names what and the limit."""

    def __init__(self, what: str, limit: int):
        super().__init__(f"{what} over {limit} bytes")
        self.what = what
        self.limit = limit


async def read_body_limited(request: Request, limit: int, what: str = "request body") -> bytes:
    """The request body, at most ``limit`` bytes whatever its framing (invariant 8).

    Why not ``request.body()``: it buffers a body of any size before the route can look at
    it, and a chunked body declares no Content-Length to check first. Here a declared length
    over ``limit`` is refused unread, and the bytes are counted as they arrive: the read stops
    at ``limit + 1``, the rest is never read (the server closes the connection after the
    answer). Raises :class:`BodyTooLarge`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise BodyTooLarge(what, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(what, limit)
    return bytes(body)
