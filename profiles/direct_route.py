"""A FastAPI route for hot reads whose parameters are all plain strings.

FastAPI validates every parameter through pydantic and resolves dependencies on each
request; for a lookup whose inputs are a path segment, two optional query strings and
two optional headers, that machinery costs more CPU than the lookup. `DirectRoute`
reads those strings from the request and calls the endpoint with them, as FastAPI would
(the same names, aliases and defaults; the last value of a repeated query parameter,
the first of a repeated header), while the route stays a FastAPI route: its
parameters, security scheme and responses are published in the OpenAPI document.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response, params
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader

_PLAIN = (str, str | None)


class DirectRoute(APIRoute):
    """An async endpoint whose path, query and header parameters are unconstrained `str`
    (or `str | None` with a default) and whose only dependencies are API-key headers.

    Anything else is refused when the route is built, so a route that needs
    validation cannot silently lose it.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant = self.dependant
        endpoint = self.endpoint
        if not inspect.iscoroutinefunction(endpoint):
            raise TypeError(f"{self.path}: a DirectRoute endpoint must be async")
        if dependant.body_params or dependant.cookie_params:
            raise TypeError(f"{self.path}: a DirectRoute takes no body and no cookies")
        path_names = [_plain(self.path, f, required_ok=True) for f in dependant.path_params]
        queries = [(_plain(self.path, f), f.alias) for f in dependant.query_params]
        headers = [(_plain(self.path, f), _header_name(f)) for f in dependant.header_params]
        keys = []  # API-key headers: an empty one is no key, as APIKeyHeader reads it
        for sub in dependant.dependencies:
            if type(sub.call) is not APIKeyHeader or sub.call.auto_error or not sub.name:
                raise TypeError(f"{self.path}: a DirectRoute depends only on API-key headers")
            keys.append((sub.name, sub.call.model.name))

        async def handle(request: Request) -> Response:
            values: dict[str, Any] = {name: request.path_params[name] for name in path_names}
            query = request.query_params
            for name, key in queries:
                values[name] = query.get(key)
            head = request.headers
            for name, key in headers:
                values[name] = head.get(key)
            for name, key in keys:
                values[name] = head.get(key) or None
            return await endpoint(**values)

        return handle


def _plain(path: str, field: Any, required_ok: bool = False) -> str:
    """The parameter's name, if it is a plain string FastAPI would pass through unchanged."""
    info = field.field_info
    if info.annotation not in _PLAIN or info.metadata:
        raise TypeError(f"{path}: {field.name} must be an unconstrained str for a DirectRoute")
    if not required_ok and (info.is_required() or info.get_default() is not None):
        raise TypeError(f"{path}: {field.name} must default to None for a DirectRoute")
    return field.name


def _header_name(field: Any) -> str:
    """The header a parameter reads, as FastAPI names it (underscores become hyphens)."""
    info = field.field_info
    if isinstance(info, params.Header) and info.convert_underscores and field.alias == field.name:
        return field.alias.replace("_", "-")
    return field.alias
