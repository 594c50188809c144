"""The options of one hold, resolved and validated once: `HoldOptions`.

Every way in (`hold()`, the middleware, the per-route forms, `mutex`) resolves its keyword options
against the lock's defaults into one `HoldOptions` value; nothing downstream re-reads loose
keyword arguments or positions in a tuple. `LOCK_DEFAULT` marks an option left to the lock.
"""

from __future__ import annotations

from typing import Final, Literal, NamedTuple, TypedDict, final

__all__ = ["LOCK_DEFAULT", "HoldKeywords", "HoldOptions", "LockDefault", "OnError"]

OnError = Literal["continue", "stop"]


@final
class LockDefault:
    """The type of `LOCK_DEFAULT`: "use the lock's own value for this option"."""

    _instance: LockDefault | None = None

    def __new__(cls) -> LockDefault:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "LOCK_DEFAULT"

    def __reduce__(self) -> str:
        return "LOCK_DEFAULT"


LOCK_DEFAULT: Final = LockDefault()
"""An option left to the lock's default (the default of every per-call option)."""


class HoldOptions(NamedTuple):
    """How one hold waits and what its failure does; immutable, validated by `resolve`.

    A NamedTuple rather than a dataclass: built on every `hold()` that overrides an option,
    and a tuple is the cheapest immutable value to build and read.
    """

    timeout: float | None = None
    """Seconds to wait: None waits forever, 0 fails at once (`LockBusy`)."""
    max_waiting: int | None = None
    """How many may already wait on the key for this caller to queue (`QueueFull` past it)."""
    on_error: OnError = "continue"
    """"stop": a failure inside the hold aborts the callers queued behind it."""
    shared: bool = False
    """A reader's hold: shared holders of a key run together, never with an exclusive one."""
    max_hold: float | None = None
    """Seconds a hold may stay open: then its block is cancelled and leaving raises
    `HoldExpired` (None: unbounded)."""

    def resolve(
        self,
        timeout: float | LockDefault | None = LOCK_DEFAULT,
        max_waiting: int | LockDefault | None = LOCK_DEFAULT,
        on_error: OnError | LockDefault = LOCK_DEFAULT,
        shared: bool | LockDefault = LOCK_DEFAULT,
        max_hold: float | LockDefault | None = LOCK_DEFAULT,
    ) -> HoldOptions:
        """These options with the given ones replaced, each checked; `LOCK_DEFAULT` keeps ours."""
        return HoldOptions(
            self.timeout if timeout is LOCK_DEFAULT else check_timeout(timeout),
            self.max_waiting if max_waiting is LOCK_DEFAULT else check_max_waiting(max_waiting),
            self.on_error if on_error is LOCK_DEFAULT else check_on_error(on_error),
            self.shared if shared is LOCK_DEFAULT else check_shared(shared),
            self.max_hold if max_hold is LOCK_DEFAULT else check_max_hold(max_hold),
        )


class HoldKeywords(TypedDict, total=False):
    """The per-call options of `KeyedLock.hold`, as keyword arguments (for type checkers)."""

    timeout: float | LockDefault | None
    max_waiting: int | LockDefault | None
    on_error: OnError | LockDefault
    shared: bool | LockDefault
    max_hold: float | LockDefault | None


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError("timeout must be None or a number")
    if not timeout >= 0:
        raise ValueError("timeout must be None or a number >= 0")
    return timeout


def check_max_waiting(max_waiting: object) -> int | None:
    if max_waiting is None:
        return None
    if isinstance(max_waiting, bool) or not isinstance(max_waiting, int):
        raise TypeError("max_waiting must be None or an int")
    if max_waiting < 0:
        raise ValueError("max_waiting must be None or >= 0")
    return max_waiting


def check_on_error(on_error: object) -> OnError:
    if on_error == "continue":
        return "continue"
    if on_error == "stop":
        return "stop"
    raise ValueError("on_error must be 'continue' or 'stop'")


def check_shared(shared: object) -> bool:
    if not isinstance(shared, bool):
        raise TypeError("shared must be a bool")
    return shared


def check_max_hold(max_hold: object) -> float | None:
    if max_hold is None:
        return None
    if isinstance(max_hold, bool) or not isinstance(max_hold, (int, float)):
        raise TypeError("max_hold must be None or a number")
    if not max_hold > 0:
        raise ValueError("max_hold must be None or a number > 0")
    return max_hold
