"""The API's JSON answers: one shape for every route, errors as a stable code and a detail."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Response


def json_response(payload: Any, status: int = 200) -> Response:
    """`payload` as JSON (orjson) with `status`."""
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def error_response(status: int, code: str, detail: str) -> Response:
    """An error: `{"error": code, "detail": detail}` with `status`."""
    return json_response({"error": code, "detail": detail}, status)
