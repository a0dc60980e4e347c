"""JSON request bodies read as RFC 8259 defines JSON, on every route of the API.

Starlette reads a body with Python's `json`, which also takes NaN, Infinity and unpaired
surrogates. A model then refuses such a value, and FastAPI cannot write the 422 that
quotes it as JSON: the caller got a 500. orjson refuses them while reading, so FastAPI
answers them as it answers any body that is not JSON: 422 `json_invalid`, with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute


def read_json(body: bytes) -> Any:
    """`body` as JSON (orjson). Raises json.JSONDecodeError with what is wrong and where."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        doc, at = exc.doc, exc.pos
        if doc[at:].startswith(("NaN", "Infinity")) or doc[at - 1 : at + 8] == "-Infinity":
            raise json.JSONDecodeError("NaN and Infinity are not JSON numbers", doc, at) from exc
        raise


class StrictJSONRequest(Request):
    """A request whose `json()` is `read_json` of its body."""

    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            self._strict_json = read_json(await self.body())
        return self._strict_json


class StrictJSONRoute(APIRoute):
    """A FastAPI route that reads its JSON body with `read_json`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            if not isinstance(request, StrictJSONRequest):  # one that read its body stays
                request = StrictJSONRequest(request.scope, request.receive)
            return await handler(request)

        return strict
