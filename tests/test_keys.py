"""Key extractors read the scope the way Starlette's Request does."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.authentication import SimpleUser, UnauthenticatedUser
from starlette.requests import Request

from keyedlock_asgi import keys
from keyedlock_asgi.keys import _is_scope_extractor, _key_is_valid, _resolve_key


def make_scope(
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
    **extra: Any,
) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": headers or [],
        "query_string": query,
    }
    scope.update(extra)
    return scope


def test_header_is_case_insensitive_first_value_like_starlette() -> None:
    scope = make_scope(headers=[(b"x-user-id", b"alice"), (b"x-user-id", b"bob")])
    assert keys.header("X-User-Id")(scope) == "alice"
    assert Request(scope).headers["x-user-id"] == "alice"


def test_header_missing_or_empty_is_no_key() -> None:
    assert keys.header("X-User-Id")(make_scope()) is None
    assert keys.header("X-User-Id")(make_scope(headers=[(b"x-user-id", b"")])) is None


def test_header_non_utf8_bytes_decode_like_starlette() -> None:
    scope = make_scope(headers=[(b"x-user-id", b"\xff\xfeid")])
    assert keys.header("x-user-id")(scope) == Request(scope).headers["x-user-id"]


def test_query_param_last_value_like_starlette() -> None:
    scope = make_scope(query=b"account=A&account=B%20C&other=1")
    assert keys.query_param("account")(scope) == "B C"
    assert keys.query_param("account")(scope) == Request(scope).query_params["account"]
    assert keys.query_param("missing")(scope) is None
    assert keys.query_param("account")(make_scope()) is None
    assert keys.query_param("other")(make_scope(query=b"other=")) is None


def test_cookie_parsed_like_starlette() -> None:
    raw = b'theme=dark; session="abc\\073def"; session=second; flag'
    scope = make_scope(headers=[(b"cookie", raw)])
    assert keys.cookie("session")(scope) == Request(scope).cookies["session"] == "second"
    assert keys.cookie("theme")(scope) == "dark"
    quoted = make_scope(headers=[(b"cookie", b'session="abc\\073def"')])
    assert keys.cookie("session")(quoted) == Request(quoted).cookies["session"]
    assert keys.cookie("nope")(scope) is None
    assert keys.cookie("session")(make_scope()) is None


def test_path_param_prefers_router_params_then_templates() -> None:
    extractor = keys.path_param("order_id")
    assert extractor(make_scope(path_params={"order_id": 7})) == "7"
    assert extractor(make_scope(**{"keyedlock.path_params": {"order_id": 8}})) == "8"
    both = make_scope(path_params={"order_id": 1}, **{"keyedlock.path_params": {"order_id": 2}})
    assert extractor(both) == "1"
    assert extractor(make_scope()) is None


def test_user_reads_authenticated_identity() -> None:
    assert keys.user()(make_scope(user=SimpleUser("alice"))) == "alice"
    assert keys.user("display_name")(make_scope(user=SimpleUser("bob"))) == "bob"
    assert keys.user()(make_scope(user=UnauthenticatedUser())) is None


def test_user_without_auth_middleware_fails_loudly() -> None:
    with pytest.raises(RuntimeError, match="AuthenticationMiddleware"):
        keys.user()(make_scope())


def test_client_ip() -> None:
    assert keys.client_ip()(make_scope(client=("10.0.0.1", 5000))) == "10.0.0.1"
    assert keys.client_ip()(make_scope(client=None)) is None


def test_first_and_combine_sync() -> None:
    scope = make_scope(headers=[(b"x-a", b"1")], query=b"b=2")
    assert keys.first(keys.header("x-missing"), keys.header("x-a"))(scope) == "1"
    assert keys.first(keys.header("x-missing"))(scope) is None
    assert keys.combine(keys.header("x-a"), keys.query_param("b"))(scope) == "1:2"
    assert keys.combine(keys.header("x-a"), keys.query_param("b"), sep="/")(scope) == "1/2"
    assert keys.combine(keys.header("x-a"), keys.header("x-missing"))(scope) is None


@pytest.mark.anyio
async def test_first_and_combine_with_async_and_plain_callables() -> None:
    calls: list[str] = []

    async def tenant(scope: Any) -> str | None:
        calls.append("tenant")
        return "t1"

    async def nothing(scope: Any) -> str | None:
        calls.append("nothing")
        return ""

    def plain(scope: Any) -> str:
        calls.append("plain")
        return "p"

    scope = make_scope()
    assert await _resolve_key(keys.first(nothing, tenant, plain), scope) == "t1"
    assert calls == ["nothing", "tenant"]
    assert await _resolve_key(keys.combine(plain, tenant, plain), scope) == "p:t1:p"
    assert await _resolve_key(keys.combine(tenant, nothing, plain), scope) is None
    assert await _resolve_key(tenant, scope) == "t1"
    assert await _resolve_key(nothing, scope) is None


@pytest.mark.anyio
async def test_extractor_returning_a_non_str_is_an_error() -> None:
    with pytest.raises(TypeError, match="str or None"):
        await _resolve_key(lambda scope: 42, make_scope())


def test_key_validation() -> None:
    assert _key_is_valid("user:1")
    assert _key_is_valid("josé ünïcode")
    assert _key_is_valid("x" * 256)
    assert not _key_is_valid("x" * 257)
    assert _key_is_valid("x" * 10, max_length=10)
    assert not _key_is_valid("a\nb")
    assert not _key_is_valid("a\x00b")
    assert not _key_is_valid("a\x7fb")
    assert not _key_is_valid("a\x85b")  # C1 control
    assert not _key_is_valid("a\ud800b")  # lone surrogate


def test_builtin_extractors_are_recognisable() -> None:
    assert _is_scope_extractor(keys.header("x"))
    assert _is_scope_extractor(keys.first(keys.header("x")))
    assert not _is_scope_extractor(lambda scope: "k")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="header name"):
        keys.header("")
    with pytest.raises(ValueError, match="at least one"):
        keys.first()
    with pytest.raises(TypeError, match="callables"):
        keys.combine("x-user")  # type: ignore[arg-type]
    assert repr(keys.combine(keys.header("A"), keys.client_ip())) == (
        "keys.combine(keys.header('a'), keys.client_ip(), sep=':')"
    )
