"""A FastAPI route for hot reads whose parameters are all plain strings.

FastAPI validates every parameter through pydantic and resolves dependencies on each
request; for a lookup whose inputs are a path segment, two optional query strings and
two optional headers, that machinery costs more CPU than the lookup. `DirectRoute`
reads those strings from the request and calls the endpoint with them, as FastAPI would
(the same names, aliases and defaults; the last value of a repeated query parameter,
the first of a repeated header), while the route stays a FastAPI route: its
parameters, security scheme and responses are published in the OpenAPI document.

A required query or header parameter, or one with a `max_length`, is checked by a
comparison; a request that lacks it or exceeds the length is handed to FastAPI's own
handler, so its 422 answer is FastAPI's, word for word. So is a JSON body: read as JSON
(`profiles/json_body.py`, as every route of the API reads one) and validated by its
pydantic model, or, when either fails or the request is not `application/json`, handed to
FastAPI.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Coroutine
from typing import Any

from annotated_types import MaxLen
from fastapi import Request, Response, params
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ValidationError

from profiles.json_body import StrictJSONRequest, StrictJSONRoute

_PLAIN = (str, str | None)


class DirectRoute(StrictJSONRoute):
    """An async endpoint whose path, query and header parameters are `str` (required, or
    `str | None` defaulting to None), constrained at most by a `max_length`, and whose
    only dependencies are API-key headers; and at most one body, a pydantic model.

    Anything else is refused when the route is built, so a route that needs
    validation cannot silently lose it.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant = self.dependant
        endpoint = self.endpoint
        if not inspect.iscoroutinefunction(endpoint):
            raise TypeError(f"{self.path}: a DirectRoute endpoint must be async")
        if dependant.cookie_params:
            raise TypeError(f"{self.path}: a DirectRoute takes no cookies")
        body: tuple[str, type[BaseModel]] | None = None
        if dependant.body_params:
            (field, *more) = dependant.body_params
            model = field.field_info.annotation
            if more or not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise TypeError(f"{self.path}: a DirectRoute's body is one pydantic model")
            body = (field.name, model)
        path_names = [_plain(self.path, f, in_path=True)[0] for f in dependant.path_params]
        queries = [(*_plain(self.path, f), f.alias) for f in dependant.query_params]
        headers = [(*_plain(self.path, f), _header_name(f)) for f in dependant.header_params]
        keys = []  # API-key headers: an empty one is no key, as APIKeyHeader reads it
        for sub in dependant.dependencies:
            if type(sub.call) is not APIKeyHeader or sub.call.auto_error or not sub.name:
                raise TypeError(f"{self.path}: a DirectRoute depends only on API-key headers")
            keys.append((sub.name, sub.call.model.name))

        validated = super().get_route_handler()  # FastAPI's, for the requests it refuses

        async def handle(request: Request) -> Response:
            values: dict[str, Any] = {name: request.path_params[name] for name in path_names}
            for found, fields in ((request.query_params, queries), (request.headers, headers)):
                for name, required, limit, key in fields:
                    value = found.get(key)
                    if value is None:
                        if required:
                            return await validated(request)
                    elif limit is not None and len(value) > limit:
                        return await validated(request)
                    values[name] = value
            head = request.headers
            for name, key in keys:
                values[name] = head.get(key) or None
            if body is not None:
                if head.get("content-type") != "application/json":
                    return await validated(request)
                # Read once: FastAPI's handler, if it must answer, reuses this request.
                request = StrictJSONRequest(request.scope, request.receive)
                try:
                    values[body[0]] = body[1].model_validate(await request.json())
                except (json.JSONDecodeError, ValidationError):
                    return await validated(request)
            return await endpoint(**values)

        return handle


def _plain(path: str, field: Any, in_path: bool = False) -> tuple[str, bool, int | None]:
    """The parameter's name, whether it is required and its maximum length, if it is a
    string FastAPI would pass through unchanged once those hold."""
    info = field.field_info
    limits = [m.max_length for m in info.metadata if type(m) is MaxLen]
    if info.annotation not in _PLAIN or len(limits) != len(info.metadata) or (in_path and limits):
        raise TypeError(
            f"{path}: {field.name} must be a str constrained at most by max_length "
            "for a DirectRoute"
        )
    required = info.is_required()
    if not in_path and not required and info.get_default() is not None:
        raise TypeError(f"{path}: {field.name} must be required or default to None")
    return field.name, required, limits[0] if limits else None


def _header_name(field: Any) -> str:
    """The header a parameter reads, as FastAPI names it (underscores become hyphens)."""
    info = field.field_info
    if isinstance(info, params.Header) and info.convert_underscores and field.alias == field.name:
        return field.alias.replace("_", "-")
    return field.alias
