"""Hand an endpoint the body chunks read while its request queued (Starlette and FastAPI)."""

from __future__ import annotations

from starlette.requests import Request

from .._types import Receive

__all__ = ["replay_into"]


def replay_into(request: Request, replay: Receive) -> Receive:
    """Make `request` read through `replay` (the chunks buffered while queued, then the rest).

    The endpoint already holds this very `Request` object (Starlette passed it to the
    decorator; FastAPI passes the dependency the same one as the endpoint), so its receive is
    replaced in place: Starlette keeps it in `_receive`, which its `receive` property and
    `stream()` read. The per-route tests over a real socket catch a Starlette that changes this.
    """
    request._receive = replay
    return replay
