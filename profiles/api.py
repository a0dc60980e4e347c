"""The profile API: unified profiles by person id or any identifier, and pipeline statistics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Query, Security
from fastapi.responses import Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field

from consent.erasure import erasure_request
from consent.policy import load_policy
from identity.normalise import ID_TYPES, parse_identifier
from pipelines import topics
from pipelines.identity_commands import reject_link_command
from pipelines.pipeline import OutRecord
from profiles.access import SUBJECT_ACCESS, ApiKey, Keyring
from profiles.audit_api import audit_router
from profiles.operator_api import mount_console, operator_router
from profiles.store import QUALITY_BUCKETS, ProfileStore

API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key (see README)")


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def _error(status: int, code: str, detail: str) -> Response:
    return _json({"error": code, "detail": detail}, status)


class ErasureRequestBody(BaseModel):
    """A data subject's erasure request: one of their identifiers, as the source wrote it."""

    type: str = Field(..., description=f"identifier type: one of {', '.join(ID_TYPES)}")
    value: str = Field(..., min_length=1, max_length=512)
    requested_by: str = Field("api", min_length=1, max_length=128)


class LinkRejection(BaseModel):
    """An operator's decision that two identity records are not one person."""

    record_a: str = Field(..., min_length=1, max_length=64)
    record_b: str = Field(..., min_length=1, max_length=64)
    reason: str = Field(..., min_length=1, max_length=500)
    operator: str = Field("api", min_length=1, max_length=128)


def create_app(
    store: ProfileStore,
    follower: Any | None = None,
    send_command: Callable[[Any], None] | None = None,
    keyring: Keyring | None = None,
    purposes: set[str] | None = None,
    bootstrap: str | None = None,
) -> FastAPI:
    """The HTTP app over one replica's store.

    `follower` (if any) is reported on /healthz; `send_command` (if any) delivers operator
    commands to the worker's command topic. `keyring` holds the API keys (none: every
    protected call is 401); `purposes` are the policy's (default: the packaged policy).
    `bootstrap` (if any) lets the operator routes read consumer lag and dead letters.
    """
    keyring = keyring or Keyring([])
    purposes = purposes if purposes is not None else set(load_policy().purposes)
    purposes = purposes | {SUBJECT_ACCESS}

    def authorize(secret: str | None, *roles: str) -> ApiKey | Response:
        """The caller's key if it has one of `roles`; else the 401 or 403 to answer with."""
        key = keyring.authenticate(secret)
        if key is None:
            return _error(401, "unauthenticated", "send a valid API key in X-API-Key")
        if key.role not in roles:
            return _error(403, "forbidden", f"role {key.role!r} may not call this")
        return key

    def authorize_command(secret: str | None) -> ApiKey | Response:
        """An admin's key, when this process can reach the worker; else the error to answer."""
        key = authorize(secret, "admin")
        if isinstance(key, Response):
            return key
        if send_command is None:
            return _error(503, "no_command_channel", "this API process cannot reach the worker")
        return key

    def authorize_read(secret: str | None, purpose: str | None) -> ApiKey | Response:
        """A profile read: a reader bound to `purpose`, or an admin; the purpose must be named."""
        key = authorize(secret, "reader", "admin")
        if isinstance(key, Response):
            return key
        if not purpose:
            return _error(400, "purpose_required", "name the purpose of the read: ?purpose=")
        if purpose not in purposes:
            return _error(400, "unknown_purpose", f"purpose must be one of {sorted(purposes)}")
        if not key.may_read(purpose):
            return _error(403, "purpose_not_bound", f"this key may not read for {purpose!r}")
        return key

    app = FastAPI(
        title="Tessera profile API",
        version="0.1.0",
        description="Unified, consent-scoped customer profiles, resolved across identifiers.",
    )

    @app.get("/healthz", summary="Liveness and replica status")
    def healthz() -> Response:
        status: dict[str, Any] = {"status": "ok"}
        if follower is not None:
            status["replica"] = {
                "following": follower.alive,
                "caught_up": follower.caught_up,
                "records_applied": follower.applied,
                "last_error": follower.last_error,
            }
            if not follower.alive:
                return _json({**status, "status": "degraded"}, 503)
        return _json(status)

    @app.get("/readyz", summary="Ready to serve: the replica has read every topic to its end")
    def readyz() -> Response:
        if follower is None or (follower.alive and follower.caught_up):
            return _json({"status": "ready"})
        return _json({"status": "catching_up", "records_applied": follower.applied}, 503)

    @app.get("/v1/stats", summary="Counts of every outcome, persons and merges")
    def stats() -> Response:
        return _json(store.stats())

    @app.get("/v1/quality", summary="Rejections per time bucket, source and reason; alerts")
    def quality(
        bucket: str = Query("hour", description="time bucket: minute, hour or day"),
    ) -> Response:
        if bucket not in QUALITY_BUCKETS:
            return _error(400, "invalid_bucket", f"bucket must be one of {sorted(QUALITY_BUCKETS)}")
        return _json(store.quality(bucket))

    @app.get("/v1/profiles/lookup", summary="The profile holding an identifier")
    def lookup(
        type: str = Query(..., description=f"identifier type: one of {', '.join(ID_TYPES)}"),
        value: str = Query(
            ..., max_length=512, description="identifier value, as the source wrote it"
        ),
        purpose: str | None = Query(None, description="the purpose of the read"),
        secret: str | None = Security(API_KEY),
    ) -> Response:
        denied = authorize_read(secret, purpose)
        if isinstance(denied, Response):
            return denied
        if type not in ID_TYPES:
            return _error(400, "unknown_identifier_type", f"type must be one of {list(ID_TYPES)}")
        if parse_identifier(type, value) is None:
            return _error(400, "invalid_identifier", f"{value!r} is not a valid {type}")
        profile = store.lookup(type, value, purpose)
        if profile is None:
            return _error(404, "not_found", f"no {purpose} profile holds {type} {value!r}")
        return _json(profile)

    @app.get("/v1/profiles/{person_id}", summary="The unified profile of a person")
    def get_profile(
        person_id: str,
        purpose: str | None = Query(None, description="the purpose of the read"),
        secret: str | None = Security(API_KEY),
    ) -> Response:
        denied = authorize_read(secret, purpose)
        if isinstance(denied, Response):
            return denied
        if len(person_id) > 128:
            return _error(400, "invalid_person_id", "person ids are at most 128 characters")
        profile = store.get(person_id, purpose)
        if profile is None:
            return _error(404, "not_found", f"no {purpose} profile {person_id!r}")
        return _json(profile)

    @app.get("/v1/identity/{person_id}/explain", summary="Why these records are one person")
    def explain(person_id: str, secret: str | None = Security(API_KEY)) -> Response:
        denied = authorize(secret, "auditor", "admin")
        if isinstance(denied, Response):
            return denied
        if len(person_id) > 128:
            return _error(400, "invalid_person_id", "person ids are at most 128 characters")
        explanation = store.explain(person_id)
        if explanation is None:
            return _error(404, "not_found", f"no person {person_id!r}")
        return _json(explanation)

    @app.post(
        "/v1/identity/links/reject",
        status_code=202,
        summary="Reject a link: the worker splits the records and never relinks them",
    )
    def reject(rejection: LinkRejection, secret: str | None = Security(API_KEY)) -> Response:
        denied = authorize_command(secret)
        if isinstance(denied, Response):
            return denied
        if rejection.record_a == rejection.record_b:
            return _error(400, "same_record", "record_a and record_b must differ")
        command = reject_link_command(
            rejection.record_a, rejection.record_b, rejection.reason, rejection.operator
        )
        send_command(command)  # type: ignore[misc]
        return _json(
            {"status": "accepted", "command_id": orjson.loads(command.value)["command_id"]}, 202
        )

    @app.post(
        "/v1/privacy/erasures",
        status_code=202,
        summary="Erase a data subject: the worker carries it out and certifies it",
    )
    def erase(body: ErasureRequestBody, secret: str | None = Security(API_KEY)) -> Response:
        denied = authorize_command(secret)
        if isinstance(denied, Response):
            return denied
        if body.type not in ID_TYPES:
            return _error(400, "unknown_identifier_type", f"type must be one of {list(ID_TYPES)}")
        identifier = parse_identifier(body.type, body.value)
        if identifier is None:
            return _error(400, "invalid_identifier", f"not a valid {body.type}")
        request = erasure_request(identifier, f"{denied.name}: {body.requested_by}")
        send_command(  # type: ignore[misc]
            OutRecord(topics.PRIVACY, request["request_id"].encode(), orjson.dumps(request))
        )
        return _json(
            {
                "status": "accepted",
                "request_id": request["request_id"],
                "subject": request["subject"],
                "certificate": f"/v1/privacy/erasures/{request['request_id']}",
            },
            202,
        )

    @app.get("/v1/privacy/erasures/{request_id}", summary="The certificate of an erasure")
    def erasure(request_id: str, secret: str | None = Security(API_KEY)) -> Response:
        denied = authorize(secret, "auditor", "admin")
        if isinstance(denied, Response):
            return denied
        if len(request_id) > 64:
            return _error(400, "invalid_request_id", "request ids are at most 64 characters")
        certificate = store.erasure(request_id)
        if certificate is None:
            return _error(404, "not_found", f"no certificate for {request_id!r} (yet)")
        return _json(certificate)

    app.include_router(audit_router(store, authorize, follower, purposes))
    # Operator routes (metrics, lag, dead letters) and the console live in their own modules.
    app.include_router(operator_router(store, bootstrap, authorize, API_KEY, purposes))
    mount_console(app)
    return app
