"""Route templates (Starlette syntax) matched before routing, without importing any framework.

An outer middleware runs before the router, so `scope["path_params"]` is empty there. The
templates given to `include`/`exclude` are compiled once and matched against the route path
(the request path without `root_path`, as Starlette's router does); the parameters of the
`include` template that matched are what `keys.path_param` reads.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from ._types import Scope

__all__ = ["RouteFilter", "RouteTemplate", "route_path"]

_PARAM = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::([a-zA-Z_][a-zA-Z0-9_]*))?}")

_CONVERTERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "str": ("[^/]+", str),
    "path": (".*", str),
    "int": ("[0-9]+", int),
    "float": (r"[0-9]+(?:\.[0-9]+)?", float),
    "uuid": (
        "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}",
        uuid.UUID,
    ),
}


def route_path(scope: Scope) -> str:
    """The path the router matches: `path` without `root_path` (Starlette's `get_route_path`)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    if path[len(root_path)] == "/":
        return path[len(root_path) :]
    return path


class RouteTemplate:
    """One template such as `/orders/{order_id:int}/pay`, compiled to a full-match regex."""

    __slots__ = ("_converters", "_regex", "template")

    def __init__(self, template: str) -> None:
        if not isinstance(template, str) or not template.startswith("/"):
            raise ValueError(f"a route template must be a str starting with '/': {template!r}")
        pattern = "^"
        converters: dict[str, Callable[[str], Any]] = {}
        end = 0
        for match in _PARAM.finditer(template):
            name, converter = match.group(1), match.group(2) or "str"
            if converter not in _CONVERTERS:
                raise ValueError(f"unknown path converter {converter!r} in {template!r}")
            if name in converters:
                raise ValueError(f"duplicate parameter {name!r} in {template!r}")
            regex, convert = _CONVERTERS[converter]
            pattern += re.escape(template[end : match.start()]) + f"(?P<{name}>{regex})"
            converters[name] = convert
            end = match.end()
        pattern += re.escape(template[end:]) + "$"
        self.template = template
        self._regex = re.compile(pattern)
        self._converters = converters

    def match(self, path: str) -> dict[str, Any] | None:
        """The converted parameters if `path` matches, else None."""
        found = self._regex.match(path)
        if found is None:
            return None
        if not self._converters:
            return {}
        return {name: self._converters[name](value) for name, value in found.groupdict().items()}

    def __repr__(self) -> str:
        return f"RouteTemplate({self.template!r})"


def _compile(templates: Iterable[str] | None, option: str) -> tuple[RouteTemplate, ...] | None:
    if templates is None:
        return None
    if isinstance(templates, str):
        raise TypeError(f"{option} takes a list of route templates, not one str")
    return tuple(RouteTemplate(template) for template in templates)


class RouteFilter:
    """`include`/`exclude` compiled once: which requests a layer applies to."""

    __slots__ = ("_exclude", "_include")

    def __init__(self, include: Iterable[str] | None, exclude: Iterable[str] | None) -> None:
        self._include = _compile(include, "include")
        self._exclude = _compile(exclude, "exclude")

    @property
    def active(self) -> bool:
        """Whether there is anything to match (else every path applies, with no parameters)."""
        return self._include is not None or bool(self._exclude)

    def match(self, scope: Scope) -> dict[str, Any] | None:
        """None when the request is not covered; else the matched include template's params."""
        path = route_path(scope)
        if self._exclude:
            for template in self._exclude:
                if template._regex.match(path) is not None:
                    return None
        if self._include is None:
            return {}
        for template in self._include:
            params = template.match(path)
            if params is not None:
                return params
        return None
