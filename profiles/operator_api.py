"""Operator endpoints of the API process: who a key is, consumer lag, Prometheus metrics, the
dead-letter browser (list, show, replay) over the same code as `tessera dlq`, and the console.

The console is plain HTML, CSS and JavaScript in profiles/console/ with no build step: the
browser calls the same /v1 API with the key typed into it, so it can do nothing its key
may not.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Security
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from profiles.access import ApiKey
from profiles.json_body import StrictJSONRoute
from profiles.metrics import CachedLag, api_registry
from profiles.responses import error_response as _error
from profiles.responses import json_response as _json
from profiles.store import ProfileStore

Authorize = Callable[..., "ApiKey | Response"]
CONSOLE_FILES = Path(str(files("profiles").joinpath("console")))


class DeadLetterReplay(BaseModel):
    """Which dead letters to re-drive to their source topic, and optionally a fixed payload."""

    offsets: list[int] = Field(default_factory=list, max_length=10_000)
    reason: str | None = Field(None, max_length=100)
    topic: str | None = Field(None, max_length=200)
    fixed: str | None = Field(
        None, max_length=1_000_000, description="replacement payload (exactly one offset)"
    )


def replica_and_worker_lag(store: ProfileStore, bootstrap: str) -> list[dict[str, Any]]:
    """Lag of the worker on its input topics and of this replica on the output topics."""
    from pipelines.lag import WORKER_GROUP, group_positions, lag_report
    from pipelines.topics import WORKER_TOPICS

    positions: dict[str, dict[tuple[str, int], int | None]] = {
        "worker": group_positions(bootstrap, WORKER_GROUP, WORKER_TOPICS),
        "replica": dict(store.offsets()),
    }
    return [row.as_dict() for row in lag_report(bootstrap, positions)]


def operator_router(
    store: ProfileStore,
    bootstrap: str | None,
    authorize: Authorize,
    api_key: Any,
    purposes: set[str] | None = None,
) -> APIRouter:
    """The operator routes. `authorize(secret, *roles)` is the app's key check; `api_key`
    its header scheme; `purposes` the policy's. Without `bootstrap`, lag is empty and the
    dead-letter routes answer 503."""
    from identity.normalise import ID_TYPES

    router = APIRouter(route_class=StrictJSONRoute)
    lag = CachedLag(lambda: replica_and_worker_lag(store, bootstrap)) if bootstrap else None
    registry = api_registry(store, lag)

    def dead_letter_access(secret: str | None) -> Response | None:
        """None when an admin calls and a broker is configured; else the answer to give."""
        key = authorize(secret, "admin")
        if isinstance(key, Response):
            return key
        if bootstrap is None:
            return _error(503, "no_broker", "this API process was started without a broker")
        return None

    @router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/whoami", summary="The presented key's name, role and purposes")
    def whoami(secret: str | None = Security(api_key)) -> Response:
        key = authorize(secret, "reader", "auditor", "admin")
        if isinstance(key, Response):
            return key
        readable = sorted(p for p in purposes or () if key.may_read(p))
        return _json(
            {
                "name": key.name,
                "role": key.role,
                "purposes": sorted(key.purposes),
                "readable_purposes": readable,
                "identifier_types": list(ID_TYPES),
                "may": {
                    "read_profiles": key.role in ("reader", "admin"),
                    "audit": key.role in ("auditor", "admin"),
                    "administer": key.role == "admin",
                },
            }
        )

    @router.get("/v1/lag", summary="Consumer lag per reader (worker, replica) and partition")
    def consumer_lag() -> Response:
        if lag is None:
            return _json({"partitions": [], "error": "no broker configured"})
        rows = lag.get()
        return _json({"partitions": rows, "error": lag.last_error})

    @router.get("/v1/dlq", summary="Dead letters, oldest first (admin)")
    def list_dead_letters(
        reason: str | None = Query(None, max_length=100, description="only this reason code"),
        topic: str | None = Query(None, max_length=200, description="only this source topic"),
        limit: int = Query(100, ge=1, le=1000),
        secret: str | None = Security(api_key),
    ) -> Response:
        denied = dead_letter_access(secret)
        if denied is not None:
            return denied
        from pipelines.dlq import read_dead_letters

        letters = read_dead_letters(bootstrap, reason=reason, source_topic=topic, limit=limit)
        return _json({"dead_letters": [letter.as_dict(400) for letter in letters]})

    @router.get("/v1/dlq/{offset}", summary="One dead letter with its whole payload (admin)")
    def show_dead_letter(offset: int, secret: str | None = Security(api_key)) -> Response:
        denied = dead_letter_access(secret)
        if denied is not None:
            return denied
        from pipelines.dlq import read_dead_letters

        letters = read_dead_letters(bootstrap, offsets={offset}, limit=1)
        if not letters:
            return _error(404, "not_found", f"no dead letter at offset {offset}")
        return _json(letters[0].as_dict(1_000_000))

    @router.post("/v1/dlq/replay", summary="Re-drive dead letters to their source topic (admin)")
    def replay_dead_letters(
        request: DeadLetterReplay, secret: str | None = Security(api_key)
    ) -> Response:
        denied = dead_letter_access(secret)
        if denied is not None:
            return denied
        if not (request.offsets or request.reason or request.topic):
            return _error(400, "nothing_named", "name dead letters by offsets, reason or topic")
        if request.fixed is not None and len(request.offsets) != 1:
            return _error(400, "one_offset", "a fixed payload replaces exactly one dead letter")
        from pipelines.dlq import read_dead_letters, replay

        letters = read_dead_letters(
            bootstrap,
            reason=request.reason,
            source_topic=request.topic,
            offsets=set(request.offsets) if request.offsets else None,
        )
        missing = sorted(set(request.offsets) - {letter.offset for letter in letters})
        if missing:
            return _error(404, "not_found", f"no dead letter at offset(s) {missing}")
        fixed = request.fixed.encode() if request.fixed is not None else None
        sent = replay(bootstrap, letters, fixed)
        return _json({"replayed": len(letters), "sent_per_topic": sent})

    return router


def mount_console(app: FastAPI, path: str = "/console") -> None:
    """Serve the console's files under `path` (index.html at `path`/)."""

    @app.get(path, include_in_schema=False)
    def console_root() -> RedirectResponse:
        return RedirectResponse(f"{path}/")

    app.mount(path, StaticFiles(directory=CONSOLE_FILES, html=True), name="console")
