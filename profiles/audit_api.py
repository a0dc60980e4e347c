"""The audit endpoints (auditor or admin keys): ledger verification, subject timelines,
attribute provenance and ledger exports, answered from this replica's store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import pyarrow as pa
from fastapi import APIRouter, Query, Security
from fastapi.responses import Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field

from consent.audit import EXPORT_FORMATS, Audit, parse_subject, write_export
from profiles.json_body import StrictJSONRoute
from profiles.responses import error_response as _error
from profiles.responses import json_response as _json
from profiles.store import ProfileStore

API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key (see README)")
EXPORT_MEDIA = {"parquet": "application/vnd.apache.parquet", "csv": "text/csv; charset=utf-8"}


class ApiError(BaseModel):
    error: str = Field(..., description="a stable code: unauthenticated, forbidden, not_found, ...")
    detail: str


class VerifyReport(BaseModel):
    """The ledger's chain recomputed from genesis on this replica."""

    ok: bool = Field(..., description="true when every entry's hash holds")
    entries: int = Field(..., description="entries checked (up to and including a broken one)")
    first_broken_seq: int | None = Field(
        None, description="sequence number of the first broken entry"
    )
    event_key: str | None = Field(None, description="event key of the first broken entry")
    problem: str | None = Field(None, description="what is wrong with it")
    replica_caught_up: bool | None = Field(
        None, description="whether this replica had read every topic to its end (null: no follower)"
    )


class SubjectRef(BaseModel):
    type: str = Field(..., description="the identifier type asked for")
    identifier_hash: str = Field(
        ..., description="the identifier as the ledger names it (TYPE:hash)"
    )
    person_id: str | None = Field(None, description="the person holding it now, if known")
    person_ids: list[str] = Field(..., description="every person id that is now this person")
    identifier_hashes: list[str] = Field(..., description="hashes of all the person's identifiers")


class ConsentInForce(BaseModel):
    status: str = Field(..., description="granted | denied | withdrawn")
    since: str | None = Field(None, description="the statement's own time")
    event_key: str
    source: str | None = Field(None, description="CMP name, or event-context")
    policy_version: str | None = None
    jurisdiction: str | None = None


class TimelineRow(BaseModel):
    """One thing that happened to the subject. `detail` by category:
    consent: source, policy_version, jurisdiction, arrived_out_of_order, in_force,
    superseded_by; decision / erasure: basis, consent_ref, policy_version, jurisdiction,
    fields_masked, attributes, person_id (the person the event belongs to now), hash, and,
    when it was ingested as another person, ingested_as and moved_by (merge | split);
    identity: link_id, person_id, other_person_id, rule."""

    category: Literal["consent", "decision", "identity", "erasure"]
    at: str | None = Field(None, description="event time (ISO 8601); rows are ordered by it")
    seq: int | None = Field(None, description="ledger sequence number (null for identity rows)")
    event_key: str | None = None
    kind: str | None = Field(None, description="event kind, or identity event kind")
    purpose: str | None = None
    outcome: str = Field(
        ..., description="consent status | applied | withheld | recorded | identity kind"
    )
    detail: dict[str, Any]


class SubjectTimeline(BaseModel):
    subject: SubjectRef
    current_consent: dict[str, ConsentInForce] = Field(
        ..., description="per purpose, the statement in force (latest by its own time)"
    )
    counts: dict[str, int] = Field(..., description="consent, applied, withheld, identity, erasure")
    timeline: list[TimelineRow]


class Admission(BaseModel):
    """How the gate admitted (or withheld) one event."""

    seq: int
    event_key: str
    kind: str | None = None
    at: str | None = None
    decision: str = Field(..., description="applied | withheld | recorded")
    purpose: str | None = Field(None, description="the purpose it was ingested for")
    basis: str | None = Field(
        None,
        description="no-consent-needed | event-preferences | stored-consent | jurisdiction-default",
    )
    consent_ref: str | None = None
    policy_version: str | None = None
    jurisdiction: str | None = None
    fields_masked: list[str] = []
    attributes: list[str] = []
    person_id: str | None = None
    hash: str
    consent: dict[str, Any] | None = Field(
        None, description="the consent statement relied on, or the jurisdiction default"
    )
    source_of: list[str] = Field([], description="purpose views whose value comes from it now")


class AttributeView(BaseModel):
    purpose: str
    present: bool = Field(..., description="whether this purpose's view holds the attribute")
    source_event: str | None = Field(None, description="the event its current value comes from")
    ts: str | None = None
    admitted: Admission | None = None
    consent_in_force: ConsentInForce | None = None


class AttributeProvenance(BaseModel):
    person_id: str
    attribute: str
    computed: bool = Field(..., description="a computed trait (aggregated over events)")
    views: list[AttributeView]
    events: list[Admission] = Field(..., description="every event that produced it, oldest first")
    truncated: bool


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ApiError, "description": "no or an unknown API key"},
    403: {"model": ApiError, "description": "the key is not an auditor's or an admin's"},
}


def audit_router(
    store: ProfileStore,
    authorize: Callable[..., Any],
    follower: Any | None = None,
    purposes: set[str] | None = None,
) -> APIRouter:
    """Routes under /v1/audit. `authorize(secret, *roles)` returns the key or the 401/403;
    `purposes` are the views an attribute's provenance covers (default: the policy's)."""
    router = APIRouter(prefix="/v1/audit", tags=["audit"], route_class=StrictJSONRoute)
    audit = Audit(store.conn, store, purposes)

    def denied(secret: str | None) -> Response | None:
        key = authorize(secret, "auditor", "admin")
        return key if isinstance(key, Response) else None

    @router.get(
        "/verify",
        summary="Recompute the lineage ledger's hash chain; name the first broken entry",
        response_model=VerifyReport,
        responses=_ERRORS,
    )
    def verify(secret: str | None = Security(API_KEY)) -> Response:
        if (response := denied(secret)) is not None:
            return response
        report: dict[str, Any] = audit.verify().as_dict()
        report["replica_caught_up"] = follower.caught_up if follower is not None else None
        return _json(report)

    @router.get(
        "/subjects/{subject}",
        summary="A subject's timeline: consent, ingestion decisions, identity events, erasures",
        response_model=SubjectTimeline,
        responses={**_ERRORS, 400: {"model": ApiError}, 404: {"model": ApiError}},
    )
    def subject(subject: str, secret: str | None = Security(API_KEY)) -> Response:
        """`subject` is TYPE:VALUE, e.g. `email:ada@example.org` (URL-encoded)."""
        if (response := denied(secret)) is not None:
            return response
        try:
            identifier = parse_subject(subject)
        except ValueError as exc:
            return _error(400, "invalid_subject", str(exc))
        timeline = audit.subject(identifier)
        if timeline is None:
            return _error(404, "not_found", "the ledger holds nothing on this subject")
        return _json(timeline)

    @router.get(
        "/profiles/{person_id}/attributes/{name}",
        summary="The provenance of one attribute: producing events, consent and policy, per purpose",
        response_model=AttributeProvenance,
        responses={**_ERRORS, 400: {"model": ApiError}, 404: {"model": ApiError}},
    )
    def attribute(
        person_id: str,
        name: str,
        limit: int = Query(1000, ge=1, le=100_000, description="most producing events listed"),
        secret: str | None = Security(API_KEY),
    ) -> Response:
        if (response := denied(secret)) is not None:
            return response
        if len(person_id) > 128 or len(name) > 128:
            return _error(
                400, "too_long", "person ids and attribute names are at most 128 characters"
            )
        provenance = audit.attribute(person_id, name, limit=limit)
        if provenance is None:
            return _error(404, "not_found", f"no attribute {name!r} of person {person_id!r}")
        return _json(provenance)

    @router.get(
        "/export",
        summary="The ledger (or one subject's entries) as Parquet or CSV, hashes included",
        responses={
            **_ERRORS,
            400: {"model": ApiError},
            200: {
                "description": "one row per ledger entry: seq, event_key, kind, event_ts, "
                "decision, purpose, basis, consent_ref, jurisdiction, policy_version, "
                "person_id, subjects/statements/attributes/fields_masked (JSON text), "
                "entry (the canonical JSON its hash covers), prev_hash, hash",
                "content": {EXPORT_MEDIA["parquet"]: {}, EXPORT_MEDIA["csv"]: {}},
            },
        },
    )
    def export(
        format: str = Query("parquet", description="parquet or csv"),
        identifier: str | None = Query(None, description="TYPE:VALUE: only this subject's entries"),
        secret: str | None = Security(API_KEY),
    ) -> Response:
        if (response := denied(secret)) is not None:
            return response
        if format not in EXPORT_FORMATS:
            return _error(400, "invalid_format", f"format must be one of {list(EXPORT_FORMATS)}")
        try:
            subject = parse_subject(identifier) if identifier else None
        except ValueError as exc:
            return _error(400, "invalid_subject", str(exc))
        sink = pa.BufferOutputStream()
        write_export(audit.export_table(subject), sink, format)
        return Response(
            sink.getvalue().to_pybytes(),
            media_type=EXPORT_MEDIA[format],
            headers={"Content-Disposition": f'attachment; filename="lineage.{format}"'},
        )

    return router
