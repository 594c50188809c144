"""`scope["keyedlock"]`: the holds taken for one request, shared by every HTTP layer.

The ASGI scope dict travels down the whole Starlette/FastAPI stack, so a layer further in (a
route decorator, a dependency) can see which keys a layer further out (the middleware) already
took for this request, and does not take them again (that would be re-entry). Each layer adds
its `Held` while it holds and takes it out when it lets go; a list a layer made for the request
is dropped with its last hold, so nothing of ours outlives the request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._lock import Held, KeyedLock
    from ._types import Scope

__all__ = ["SCOPE_KEY", "held_by_outer_layer", "record", "unrecord"]

SCOPE_KEY = "keyedlock"
"""`scope["keyedlock"]`: the `Held` of each layer holding keys for this request, outermost first."""


def held_by_outer_layer(scope: Scope, lock: KeyedLock, key: str) -> Held | None:
    """The hold of a layer further out that already has `key` of `lock` for this request."""
    records: list[Held] | None = scope.get(SCOPE_KEY)
    if records:
        for held in records:
            if held.lock is lock and key in held.keys:
                return held
    return None


def record(scope: Scope, held: Held) -> tuple[list[Held], bool]:
    """Add `held` to the request's records: (the list, whether this call made it)."""
    records: list[Held] | None = scope.get(SCOPE_KEY)
    if records is None:
        records = scope[SCOPE_KEY] = [held]
        return records, True
    records.append(held)
    return records, False


def unrecord(scope: Scope, records: list[Held], held: Held, ours: bool) -> None:
    """Take `held` out of the records, dropping the entry if `record` made it for this hold
    (whatever the app did to the entry meanwhile)."""
    if ours and scope.get(SCOPE_KEY) is records:
        del scope[SCOPE_KEY]
    elif held in records:
        records.remove(held)
