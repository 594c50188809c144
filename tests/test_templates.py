"""Route templates: Starlette's syntax and converters, matched against the route path."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from starlette.routing import compile_path

from keyedlock_asgi._templates import RouteFilter, RouteTemplate, route_path


def scope_for(path: str, root_path: str = "") -> dict[str, Any]:
    return {"type": "http", "path": path, "root_path": root_path}


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        ("/orders/{order_id}", "/orders/abc", {"order_id": "abc"}),
        ("/orders/{order_id:str}/pay", "/orders/a-b/pay", {"order_id": "a-b"}),
        ("/orders/{order_id:int}/pay", "/orders/007/pay", {"order_id": 7}),
        ("/price/{p:float}", "/price/3.50", {"p": 3.5}),
        ("/files/{rest:path}", "/files/a/b/c.txt", {"rest": "a/b/c.txt"}),
        (
            "/u/{id:uuid}",
            "/u/12345678-1234-5678-1234-567812345678",
            {"id": uuid.UUID("12345678-1234-5678-1234-567812345678")},
        ),
        ("/a/{x}/b/{y:int}", "/a/1/b/2", {"x": "1", "y": 2}),
        ("/health", "/health", {}),
        ("/v1.0/{x}", "/v1.0/q", {"x": "q"}),
    ],
)
def test_matches_like_starlette(template: str, path: str, expected: dict[str, Any]) -> None:
    assert RouteTemplate(template).match(path) == expected
    regex, _, convertors = compile_path(template)
    found = regex.match(path)
    assert found is not None
    starlette_params = {k: convertors[k].convert(v) for k, v in found.groupdict().items()}
    assert starlette_params == expected


@pytest.mark.parametrize(
    ("template", "path"),
    [
        ("/orders/{order_id:int}/pay", "/orders/abc/pay"),
        ("/orders/{order_id}", "/orders/a/b"),
        ("/orders/{order_id}", "/orders/"),
        ("/health", "/health/"),
        ("/health", "/healthz"),
        ("/v1.0/{x}", "/v1x0/q"),
        ("/price/{p:float}", "/price/3."),
    ],
)
def test_non_matches(template: str, path: str) -> None:
    assert RouteTemplate(template).match(path) is None


def test_invalid_templates() -> None:
    with pytest.raises(ValueError, match="unknown path converter"):
        RouteTemplate("/x/{a:nope}")
    with pytest.raises(ValueError, match="duplicate"):
        RouteTemplate("/x/{a}/{a}")
    with pytest.raises(ValueError, match="starting with '/'"):
        RouteTemplate("x/{a}")
    with pytest.raises(TypeError, match="list of route templates"):
        RouteFilter("/x", None)


def test_route_path_strips_root_path_like_starlette() -> None:
    assert route_path(scope_for("/api/orders/1", "/api")) == "/orders/1"
    assert route_path(scope_for("/api", "/api")) == ""
    assert route_path(scope_for("/apiary/x", "/api")) == "/apiary/x"
    assert route_path(scope_for("/other", "/api")) == "/other"
    assert route_path(scope_for("/x")) == "/x"


def test_filter_include_exclude() -> None:
    every = RouteFilter(None, None)
    assert not every.active
    only = RouteFilter(["/orders/{id:int}", "/users/{id}"], ["/users/admin"])
    assert only.active
    assert only.match(scope_for("/orders/05")) == {"id": 5}
    assert only.match(scope_for("/users/bob")) == {"id": "bob"}
    assert only.match(scope_for("/users/admin")) is None
    assert only.match(scope_for("/elsewhere")) is None
    assert only.match(scope_for("/api/orders/1", "/api")) == {"id": 1}
    excluded = RouteFilter(None, ["/health"])
    assert excluded.active
    assert excluded.match(scope_for("/health")) is None
    assert excluded.match(scope_for("/x")) == {}
