"""Key extractors: where a request's lock key comes from.

A key extractor is any callable `(scope) -> str | None` or `(scope) -> Awaitable[str | None]`.
`None` (or an empty string) means "this request has no key". The helpers here read the ASGI
scope directly, the way Starlette's `Request` would, so the key is what the endpoint sees:
the first value of a header, the last value of a query parameter or cookie (Starlette's choice:
anything else lets a client lock one value and act on another).
"""

from __future__ import annotations

import inspect
import unicodedata
from collections.abc import Awaitable, Callable, Iterable
from http import cookies as _http_cookies
from typing import Any, TypeAlias
from urllib.parse import parse_qsl

from ._types import Scope

__all__ = [
    "Extractor",
    "KeyExtractor",
    "client_ip",
    "combine",
    "cookie",
    "extractor",
    "first",
    "header",
    "path_param",
    "query_param",
    "user",
]

KeyResult: TypeAlias = "str | Awaitable[str | None] | None"
KeyExtractor: TypeAlias = Callable[[Scope], "str | Awaitable[str | None] | None"]

TEMPLATE_PARAMS = "keyedlock.path_params"
"""Scope entry where the middleware puts the parameters of the route template it matched."""

_cookie_unquote: Callable[[str], str] = _http_cookies._unquote


class Extractor:
    """Base of request key extractors: subclass it (define `__call__(scope)`) or wrap a
    function with `keys.extractor`.

    Any callable taking the scope works as a key; what this base adds is that `lock.depends`
    reads an `Extractor` from the request instead of treating it as a FastAPI dependency.
    """

    __slots__ = ()

    def __call__(self, scope: Scope) -> KeyResult:
        raise NotImplementedError("an Extractor subclass defines __call__(scope)")


def _is_scope_extractor(extractor: object) -> bool:
    """Whether `extractor` reads the request (is not a FastAPI dependency)."""
    return isinstance(extractor, Extractor)


class _Function(Extractor):
    __slots__ = ("_function",)

    def __init__(self, function: KeyExtractor) -> None:
        self._function = function

    def __call__(self, scope: Scope) -> KeyResult:
        return self._function(scope)

    def __repr__(self) -> str:
        return f"keys.extractor({getattr(self._function, '__qualname__', self._function)!r})"


def extractor(function: KeyExtractor) -> Extractor:
    """Mark `function(scope) -> str | None` (or an async one) as a request key extractor."""
    if not callable(function):
        raise TypeError("keys.extractor wraps a callable taking the ASGI scope")
    return _Function(function)


class _Header(Extractor):
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name.lower().encode("latin-1")

    def __call__(self, scope: Scope) -> str | None:
        name = self._name
        for field, value in scope["headers"]:
            if field == name:
                # Latin-1 maps every byte to one character, as Starlette's Headers do.
                return value.decode("latin-1") or None
        return None

    def __repr__(self) -> str:
        return f"keys.header({self._name.decode('latin-1')!r})"


def header(name: str) -> KeyExtractor:
    """The first value of the request header `name` (case-insensitive); empty means no key."""
    if not isinstance(name, str) or not name:
        raise ValueError("header() needs a header name")
    return _Header(name)


class _PathParam(Extractor):
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, scope: Scope) -> str | None:
        params = scope.get("path_params")
        if params:
            value = params.get(self._name)
            if value is not None:
                return str(value)
        params = scope.get(TEMPLATE_PARAMS)
        if params:
            value = params.get(self._name)
            if value is not None:
                return str(value)
        return None

    def __repr__(self) -> str:
        return f"keys.path_param({self._name!r})"


def path_param(name: str) -> KeyExtractor:
    """A path parameter: from the router (`scope["path_params"]`) once routed, or from the
    middleware's `include` route templates before routing. The converted value, as `str`."""
    if not isinstance(name, str) or not name:
        raise ValueError("path_param() needs a parameter name")
    return _PathParam(name)


class _QueryParam(Extractor):
    __slots__ = ("_name", "_needle")

    def __init__(self, name: str) -> None:
        self._name = name
        self._needle = name.encode("utf-8")

    def __call__(self, scope: Scope) -> str | None:
        query: bytes = scope.get("query_string", b"")
        if not query:
            return None
        found = None
        for field, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if field == self._name:
                found = value  # the last one wins, as in Starlette's QueryParams
        return found or None

    def __repr__(self) -> str:
        return f"keys.query_param({self._name!r})"


def query_param(name: str) -> KeyExtractor:
    """The query parameter `name` (its last value, as Starlette and FastAPI read it)."""
    if not isinstance(name, str) or not name:
        raise ValueError("query_param() needs a parameter name")
    return _QueryParam(name)


class _Cookie(Extractor):
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, scope: Scope) -> str | None:
        raw = next((value for field, value in scope["headers"] if field == b"cookie"), None)
        if raw is None:
            return None
        found = None
        # The same parsing as Starlette's `cookie_parser`: first Cookie header, last one wins.
        for chunk in raw.decode("latin-1").split(";"):
            name, sep, value = chunk.partition("=")
            if not sep:
                name, value = "", chunk
            if name.strip() == self._name:
                found = _cookie_unquote(value.strip())
        return found or None

    def __repr__(self) -> str:
        return f"keys.cookie({self._name!r})"


def cookie(name: str) -> KeyExtractor:
    """The cookie `name`, parsed the way Starlette's `request.cookies` parses it."""
    if not isinstance(name, str) or not name:
        raise ValueError("cookie() needs a cookie name")
    return _Cookie(name)


class _User(Extractor):
    __slots__ = ("_attr",)

    def __init__(self, attr: str) -> None:
        self._attr = attr

    def __call__(self, scope: Scope) -> str | None:
        if "user" not in scope:
            raise RuntimeError(
                "keys.user() reads scope['user']: install Starlette's AuthenticationMiddleware "
                "(or another that sets it) outside KeyedLockMiddleware"
            )
        found = scope["user"]
        if found is None or not getattr(found, "is_authenticated", False):
            return None
        value = getattr(found, self._attr)
        return None if value is None else str(value)

    def __repr__(self) -> str:
        return f"keys.user(attr={self._attr!r})"


def user(attr: str = "identity") -> KeyExtractor:
    """`scope["user"].<attr>` of an authenticated user (Starlette auth); None otherwise.

    Raises if nothing set `scope["user"]`: a forgotten authentication middleware must not
    silently turn into "nobody is locked".
    """
    if not isinstance(attr, str) or not attr:
        raise ValueError("user() needs an attribute name")
    return _User(attr)


class _ClientIP(Extractor):
    __slots__ = ()

    def __call__(self, scope: Scope) -> str | None:
        client = scope.get("client")
        return client[0] if client else None

    def __repr__(self) -> str:
        return "keys.client_ip()"


def client_ip() -> KeyExtractor:
    """The peer address from `scope["client"]` (behind a proxy, use uvicorn's proxy headers)."""
    return _ClientIP()


async def _settle(result: Awaitable[str | None]) -> str | None:
    value = await result
    return _checked(value)


def _checked(value: object) -> str | None:
    if value is None or type(value) is str:
        return value or None
    if isinstance(value, str):
        return str(value) or None
    raise TypeError(f"a key extractor must return str or None, not {type(value).__name__}")


class _First(Extractor):
    __slots__ = ("_extractors",)

    def __init__(self, extractors: tuple[KeyExtractor, ...]) -> None:
        self._extractors = extractors

    def __call__(self, scope: Scope) -> KeyResult:
        for index, extractor in enumerate(self._extractors):
            result = extractor(scope)
            if inspect.isawaitable(result):
                return self._rest(scope, result, index)
            if _checked(result):
                return result
        return None

    async def _rest(self, scope: Scope, pending: Awaitable[str | None], index: int) -> str | None:
        value = await _settle(pending)
        if value:
            return value
        for extractor in self._extractors[index + 1 :]:
            value = await _settle_any(extractor(scope))
            if value:
                return value
        return None

    def __repr__(self) -> str:
        return f"keys.first({', '.join(map(repr, self._extractors))})"


async def _settle_any(result: KeyResult) -> str | None:
    if inspect.isawaitable(result):
        return await _settle(result)
    return _checked(result)


def first(*extractors: KeyExtractor) -> KeyExtractor:
    """The key of the first extractor that gives one (later ones are not called)."""
    return _First(_callables("first", extractors))


class _Combine(Extractor):
    __slots__ = ("_extractors", "_sep")

    def __init__(self, extractors: tuple[KeyExtractor, ...], sep: str) -> None:
        self._extractors = extractors
        self._sep = sep

    def __call__(self, scope: Scope) -> KeyResult:
        parts: list[str] = []
        for index, extractor in enumerate(self._extractors):
            result = extractor(scope)
            if inspect.isawaitable(result):
                return self._rest(scope, parts, result, index)
            value = _checked(result)
            if not value:
                return None
            parts.append(value)
        return self._sep.join(parts)

    async def _rest(
        self, scope: Scope, parts: list[str], pending: Awaitable[str | None], index: int
    ) -> str | None:
        value = await _settle(pending)
        if not value:
            return None
        parts.append(value)
        for extractor in self._extractors[index + 1 :]:
            value = await _settle_any(extractor(scope))
            if not value:
                return None
            parts.append(value)
        return self._sep.join(parts)

    def __repr__(self) -> str:
        return f"keys.combine({', '.join(map(repr, self._extractors))}, sep={self._sep!r})"


def combine(*extractors: KeyExtractor, sep: str = ":") -> KeyExtractor:
    """All extractors' keys joined by `sep`; no key unless every one gives a key."""
    if not isinstance(sep, str):
        raise TypeError("sep must be a str")
    return _Combine(_callables("combine", extractors), sep)


def _callables(name: str, extractors: Iterable[Any]) -> tuple[KeyExtractor, ...]:
    found = tuple(extractors)
    if not found:
        raise ValueError(f"{name}() needs at least one extractor")
    for extractor in found:
        if not callable(extractor):
            raise TypeError(f"{name}() takes key extractors (callables), not {extractor!r}")
    return found


# -- resolving and validating a key (shared by the middleware and the per-route guard) -------

DEFAULT_MAX_KEY_LENGTH = 256


def _key_is_valid(key: str, max_length: int = DEFAULT_MAX_KEY_LENGTH) -> bool:
    """A key is valid when it is at most `max_length` characters and has no control characters
    (nor lone surrogates, which no engine could store)."""
    if len(key) > max_length:
        return False
    if key.isprintable():
        return True
    return not any(unicodedata.category(char) in ("Cc", "Cs") for char in key)


async def _resolve_key(extractor: KeyExtractor, scope: Scope) -> str | None:
    """Call an extractor (sync or async) and normalise its answer: `""` becomes None."""
    result = extractor(scope)
    if type(result) is str:
        return result or None
    if result is None:
        return None
    if inspect.isawaitable(result):
        return await _settle(result)
    return _checked(result)
