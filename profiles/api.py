"""The profile API: unified profiles by person id or any identifier, and pipeline statistics."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import FastAPI, Header, Query, Security
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
from profiles.direct_route import DirectRoute
from profiles.json_body import StrictJSONRoute
from profiles.operator_api import mount_console, operator_router
from profiles.reads import CoalescedReads
from profiles.responses import error_response as _error
from profiles.responses import json_response as _json
from profiles.segments import Segment, load_segments
from profiles.store import QUALITY_BUCKETS, ProfileStore

MAX_BATCH = 100  # persons per batch lookup
MAX_TRAITS = 64  # names per ?traits= selection
MAX_PAGE = 1000  # members per page

API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key (see README)")


class ErasureRequestBody(BaseModel):
    """A data subject's erasure request: one of their identifiers, as the source wrote it."""

    type: str = Field(..., description=f"identifier type: one of {', '.join(ID_TYPES)}")
    value: str = Field(..., min_length=1, max_length=512)
    requested_by: str = Field("api", min_length=1, max_length=128)


def _tagged(payload: Any) -> tuple[bytes, str]:
    """A JSON body and its ETag."""
    body = orjson.dumps(payload)
    return body, '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def _answer(body: bytes, tag: str, if_none_match: str | None) -> Response:
    """A 200 with its ETag, or a 304 when the client's copy is that one."""
    headers = {"ETag": tag, "Cache-Control": "private, no-cache"}
    if if_none_match:
        offered = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
        if tag in offered or "*" in offered:
            return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def _etagged(payload: Any, if_none_match: str | None) -> Response:
    """A 200 with an ETag over the body, or a 304 when the client's copy is that one."""
    return _answer(*_tagged(payload), if_none_match)


def parse_selection(traits: str | None) -> set[str] | Response | None:
    """The trait names of `?traits=a,b` (None: all), or the 400 to answer with."""
    if traits is None:
        return None
    names = {n.strip() for n in traits.split(",") if n.strip()}
    if not names or len(names) > MAX_TRAITS or any(len(n) > 128 for n in names):
        return _error(
            400,
            "invalid_traits",
            f"traits is a comma-separated list of 1 to {MAX_TRAITS} names (128 characters each)",
        )
    return names


def select_traits(profile: dict[str, Any], names: set[str] | None) -> dict[str, Any]:
    """A profile view with only the named identify and computed traits."""
    if names is None:
        return profile
    return {
        **profile,
        "traits": {k: v for k, v in profile["traits"].items() if k in names},
        "computed": {k: v for k, v in profile["computed"].items() if k in names},
    }


class BatchLookup(BaseModel):
    """Persons to read in one call (at most 100)."""

    person_ids: list[str] = Field(..., description=f"person ids, 1 to {MAX_BATCH}")


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
    segments: dict[str, Segment] | None = None,
) -> FastAPI:
    """The HTTP app over one replica's store.

    `follower` (if any) is reported on /healthz; `send_command` (if any) delivers operator
    commands to the worker's command topic. `keyring` holds the API keys (none: every
    protected call is 401); `purposes` are the policy's (default: the packaged policy).
    `bootstrap` (if any) lets the operator routes read consumer lag and dead letters.
    """
    keyring = keyring or Keyring([])
    purposes = purposes if purposes is not None else set(load_policy().purposes)
    if segments is None:
        segments = load_segments(store.traits, purposes)
    purposes = purposes | {SUBJECT_ACCESS}
    # Lookups by person id that arrive together share one query (see profiles/reads.py).
    documents = CoalescedReads(store.documents)
    # Until the identifier index is loaded (`--warm`), lookups by identifier query the
    # store, and those that arrive together share the turn.
    holders = CoalescedReads(store.persons_holding)

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

    def authorize_selection(
        secret: str | None, purpose: str | None, traits: str | None
    ) -> set[str] | Response | None:
        """A profile read's trait names (None: all), or the 4xx to answer with."""
        denied = authorize_read(secret, purpose)
        return denied if isinstance(denied, Response) else parse_selection(traits)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if store.frozen:  # warmed: what was built since (this app, the server) lives as long
            store.freeze()
        yield

    app = FastAPI(
        lifespan=lifespan,
        title="Tessera profile API",
        version="0.1.0",
        description="Unified, consent-scoped customer profiles, resolved across identifiers.",
    )
    app.router.route_class = StrictJSONRoute  # JSON bodies as RFC 8259 has them: no NaN

    @app.get("/healthz", summary="Liveness and replica status")
    async def healthz() -> Response:
        status: dict[str, Any] = {"status": "ok"}
        if follower is not None:
            status["replica"] = {
                "following": follower.alive,
                "caught_up": follower.caught_up,
                "records_applied": follower.applied,
                "applies": follower.applies,
                "apply_cpu_seconds": round(follower.apply_cpu, 3),
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
        counts = store.stats()
        counts["identifier_index"] = {
            "loaded": store.identifiers.loaded,
            **store.identifiers.footprint(),
        }
        if follower is not None:
            # at_end: the counts include everything on the topics as of the last fetch.
            counts["replica"] = {"caught_up": follower.caught_up, "at_end": follower.at_end}
        return _json(counts)

    @app.get("/v1/quality", summary="Rejections per time bucket, source and reason; alerts")
    def quality(
        bucket: str = Query("hour", description="time bucket: minute, hour or day"),
    ) -> Response:
        if bucket not in QUALITY_BUCKETS:
            return _error(400, "invalid_bucket", f"bucket must be one of {sorted(QUALITY_BUCKETS)}")
        return _json(store.quality(bucket))

    async def lookup(
        type: str = Query(..., description=f"identifier type: one of {', '.join(ID_TYPES)}"),
        value: str = Query(
            ..., max_length=512, description="identifier value, as the source wrote it"
        ),
        purpose: str | None = Query(None, description="the purpose of the read"),
        traits: str | None = Query(None, description="only these traits: a,b,c"),
        secret: str | None = Security(API_KEY),
        if_none_match: str | None = Header(None),
    ) -> Response:
        return await identified(type, value, purpose, traits, secret, if_none_match)

    async def by_identifier(
        identifier: str,
        purpose: str | None = Query(None, description="the purpose of the read"),
        traits: str | None = Query(None, description="only these traits: a,b,c"),
        secret: str | None = Security(API_KEY),
        if_none_match: str | None = Header(None),
    ) -> Response:
        id_type, sep, value = identifier.partition(":")
        if not sep or not value or len(value) > 512:
            denied = authorize_read(secret, purpose)
            if isinstance(denied, Response):
                return denied
            return _error(400, "invalid_identifier_format", "write the identifier as type:value")
        return await identified(id_type, value, purpose, traits, secret, if_none_match)

    # Lookups by identifier on the hot path too: plain strings, no per-request validation
    # (a missing or over-long type or value gets FastAPI's own 422).
    for path, endpoint, summary in (
        ("/v1/profiles/lookup", lookup, "The profile holding an identifier"),
        (
            "/v1/profiles/by-identifier/{identifier:path}",
            by_identifier,
            "The profile holding an identifier written as type:value",
        ),
    ):
        app.router.add_api_route(
            path, endpoint, methods=["GET"], summary=summary, route_class_override=DirectRoute
        )

    async def identified(
        id_type: str,
        value: str,
        purpose: str | None,
        traits: str | None,
        secret: str | None,
        if_none_match: str | None,
    ) -> Response:
        names = authorize_selection(secret, purpose, traits)
        if isinstance(names, Response):
            return names
        if id_type not in ID_TYPES:
            return _error(400, "unknown_identifier_type", f"type must be one of {list(ID_TYPES)}")
        identifier = parse_identifier(id_type, value)
        if identifier is None:
            return _error(400, "invalid_identifier", f"{value!r} is not a valid {id_type}")
        if store.identifiers.loaded:
            person = store.identifiers.person(identifier.type, identifier.value)
        else:
            person = await holders.get(f"{identifier.type}:{identifier.value}")
        answer = await rendered(person, purpose, names, if_none_match) if person else None
        if answer is None:
            return _error(404, "not_found", f"no {purpose} profile holds {id_type} {value!r}")
        return answer

    async def batch(
        request: BatchLookup,
        purpose: str | None = Query(None, description="the purpose of the read"),
        traits: str | None = Query(None, description="only these traits: a,b,c"),
        secret: str | None = Security(API_KEY),
    ) -> Response:
        names = authorize_selection(secret, purpose, traits)
        if isinstance(names, Response):
            return names
        if not request.person_ids:
            return _error(400, "no_ids", "person_ids must name at least one person")
        if len(request.person_ids) > MAX_BATCH:
            return _error(
                400,
                "too_many_ids",
                f"at most {MAX_BATCH} person ids per call ({len(request.person_ids)} sent)",
            )
        if any(not p or len(p) > 128 or not p.isprintable() for p in request.person_ids):
            return _error(400, "invalid_person_id", "person ids are 1 to 128 printable characters")
        # As `store.get_many` reads them, from memory when it can; queries shared.
        wanted = list(dict.fromkeys(request.person_ids))
        docs = [store.cached_document(p) for p in wanted]
        gaps = [n for n, doc in enumerate(docs) if doc is None]
        read = await asyncio.gather(*(documents.get(wanted[n]) for n in gaps))
        for n, doc in zip(gaps, read, strict=True):
            docs[n] = doc
        now = datetime.now(UTC)
        found = {
            person: store.view_of(doc, purpose, now) if doc else None  # type: ignore[arg-type]
            for person, doc in zip(wanted, docs, strict=True)
        }
        return _json(
            {
                "purpose": purpose,
                "profiles": {
                    person: select_traits(profile, names) if profile else None
                    for person, profile in found.items()
                },
                "missing": [person for person, profile in found.items() if profile is None],
            }
        )

    # Batch lookups on the hot path too: a JSON body valid for its model, and plain strings,
    # skip FastAPI's per-request machinery (anything else gets FastAPI's own answer).
    app.router.add_api_route(
        "/v1/profiles/batch",
        batch,
        methods=["POST"],
        summary="Up to 100 profiles in one call",
        route_class_override=DirectRoute,
    )

    @app.get("/v1/segments", summary="The declared segments and their purposes")
    def list_segments(secret: str | None = Security(API_KEY)) -> Response:
        denied = authorize(secret, "reader", "admin")
        if isinstance(denied, Response):
            return denied
        return _json(
            {
                "segments": [
                    {"name": s.name, "purpose": s.purpose, "description": s.description}
                    for s in segments.values()
                ]
            }
        )

    @app.get("/v1/segments/{name}/members", summary="A page of a segment's members")
    def members(
        name: str,
        limit: int = Query(
            100, ge=1, le=MAX_PAGE, description=f"members per page, 1 to {MAX_PAGE}"
        ),
        cursor: str | None = Query(
            None, max_length=128, description="next_cursor of the page before"
        ),
        secret: str | None = Security(API_KEY),
        if_none_match: str | None = Header(None),
    ) -> Response:
        segment = segments.get(name)
        denied = authorize_read(secret, segment.purpose if segment else SUBJECT_ACCESS)
        if isinstance(denied, Response):
            return denied
        if segment is None:
            return _error(404, "unknown_segment", f"segments are {sorted(segments)}")
        page, total, next_cursor = store.members(name, limit, cursor)
        return _etagged(
            {
                "segment": name,
                "purpose": segment.purpose,
                "total": total,
                "members": page,
                "next_cursor": next_cursor,
            },
            if_none_match,
        )

    cache = store.cache

    async def rendered(
        person_id: str, purpose: str, names: set[str] | None, if_none_match: str | None
    ) -> Response | None:
        """The answer for a person's `purpose` view, or None when there is none."""
        # Computed traits are evaluated per UTC day, so an answer holds for the day it was
        # rendered on, until a write to the person drops it.
        now = datetime.now(UTC)
        today = now.date()
        # Strings, tuples and None only: the cache's entries stay untracked by the collector.
        shape = (purpose, None if names is None else tuple(sorted(names)))
        generation = cache.generation  # before the read: a write after it refuses the answer
        kept = cache.answer(person_id, shape)
        if kept is not None and kept[0] == today:
            return _answer(kept[1], kept[2], if_none_match)
        # A document in memory is read at once; only a query waits to share with others.
        doc = store.cached_document(person_id) or await documents.get(person_id)
        profile = store.view_of(doc, purpose, now) if doc else None
        if profile is None:
            return None
        body, tag = _tagged(select_traits(profile, names))
        if profile["person_id"] == person_id:  # a merged-away id's answer is its survivor's
            cache.keep_answer(person_id, shape, (today, body, tag), generation)
        return _answer(body, tag, if_none_match)

    async def get_profile(
        person_id: str,
        purpose: str | None = Query(None, description="the purpose of the read"),
        traits: str | None = Query(None, description="only these traits: a,b,c"),
        secret: str | None = Security(API_KEY),
        if_none_match: str | None = Header(None),
    ) -> Response:
        names = authorize_selection(secret, purpose, traits)
        if isinstance(names, Response):
            return names
        if len(person_id) > 128:
            return _error(400, "invalid_person_id", "person ids are at most 128 characters")
        answer = await rendered(person_id, purpose, names, if_none_match)  # type: ignore[arg-type]
        if answer is None:
            return _error(404, "not_found", f"no {purpose} profile {person_id!r}")
        return answer

    # The hot read: its string parameters reach it without per-request validation.
    app.router.add_api_route(
        "/v1/profiles/{person_id}",
        get_profile,
        methods=["GET"],
        summary="The unified profile of a person",
        route_class_override=DirectRoute,
    )

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
