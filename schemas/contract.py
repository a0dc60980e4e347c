"""Contract stage: raw bytes in, a parsed event of a known kind or a rejection with reasons out.

Checks run cheapest first and stop at the first failure class, so every rejection has
one primary reason code (schema violations may add more).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from identity.normalise import Identifier, extract_identifiers
from quality.reasons import ReasonCode
from schemas.registry import SUPPORTED_VERSIONS, SchemaRegistry, default_registry, kind_of

MAX_PAYLOAD_BYTES = 32 * 1024  # Segment's own per-call limit
MAX_DEPTH = 32

# jsonschema-rs error kinds that have their own reason; every other kind is an invalid value.
_SCHEMA_REASONS = {
    "Required": ReasonCode.MISSING_REQUIRED_FIELD,
    "Type": ReasonCode.WRONG_TYPE,
}


@dataclass(frozen=True)
class Reason:
    """One reason an event failed its contract: a stable code and a human detail."""

    code: ReasonCode
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "detail": self.detail}


@dataclass
class ContractResult:
    """The outcome of the contract stage for one message."""

    kind: str | None = None
    version: int | None = None
    event: dict[str, Any] | None = None
    timestamp: datetime | None = None
    identifiers: list[Identifier] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.reasons


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return False


def parse_timestamp(text: str) -> datetime | None:
    """An ISO-8601 timestamp as an aware UTC datetime, or None when it is not a real time."""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _error_kind(error: Any) -> str:
    return type(error.kind).__name__.rsplit("_", 1)[-1]


def _schema_reason(error: Any) -> Reason:
    path = "/".join(str(p) for p in error.instance_path) or "(root)"
    code = _SCHEMA_REASONS.get(_error_kind(error), ReasonCode.INVALID_VALUE)
    message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
    return Reason(code, f"{path}: {message}")


def _rejected(
    code: ReasonCode, detail: str, kind: str | None = None, version: int | None = None
) -> ContractResult:
    return ContractResult(kind, version, reasons=[Reason(code, detail)])


def _unparsed(raw: bytes, error: orjson.JSONDecodeError) -> ContractResult:
    """The reason bytes orjson refused are not an event (empty, not UTF-8, too deep, bad JSON)."""
    if not raw.strip():
        return _rejected(ReasonCode.EMPTY_PAYLOAD, "message has no content")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return _rejected(ReasonCode.INVALID_UTF8, f"byte {bad.start}: {bad.reason}")
    if "recursion" in str(error) or "depth limit" in str(error):
        return _rejected(ReasonCode.TOO_DEEPLY_NESTED, f"nesting deeper than {MAX_DEPTH}")
    return _rejected(ReasonCode.MALFORMED_JSON, str(error)[:200])


def check_contract(raw: bytes, registry: SchemaRegistry | None = None) -> ContractResult:
    """Check one raw message against its contract.

    In: the message's bytes exactly as consumed. Out: a ContractResult with the parsed
    event, its kind, version and timestamp, or the reasons it was rejected.
    """
    if len(raw) > MAX_PAYLOAD_BYTES:
        return _rejected(
            ReasonCode.PAYLOAD_TOO_LARGE, f"{len(raw)} bytes > limit of {MAX_PAYLOAD_BYTES}"
        )
    try:
        # Empty, blank and invalid UTF-8 bytes all fail to parse (orjson accepts only valid
        # UTF-8): their own reasons are worked out for failures only.
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _unparsed(raw, exc)
    if type(doc) is not dict:
        return _rejected(ReasonCode.NOT_AN_OBJECT, f"top-level JSON {type(doc).__name__}")
    # Nesting needs an opening bracket per level: few brackets in all, no need to walk.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _depth_exceeds(doc, MAX_DEPTH):
        return _rejected(ReasonCode.TOO_DEEPLY_NESTED, f"nesting deeper than {MAX_DEPTH}")
    kind = kind_of(doc)
    if kind is None:
        shown = str(doc.get("type"))[:64]
        return _rejected(ReasonCode.UNKNOWN_EVENT_TYPE, f"type {shown!r} has no contract")
    version = doc.get("schemaVersion", 1)
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        return _rejected(ReasonCode.UNKNOWN_SCHEMA_VERSION, f"schemaVersion {str(version)[:32]!r}")
    contract = (registry or default_registry()).get(kind, version)
    assert contract is not None, f"registry has no {kind} v{version}"
    if not contract.validator.is_valid(doc):
        # Slow path, bad events only: every error, missing and mistyped fields first.
        errors = sorted(
            contract.validator.iter_errors(doc),
            key=lambda e: (
                _error_kind(e) not in _SCHEMA_REASONS,
                [str(p) for p in e.instance_path],
            ),
        )
        return ContractResult(kind, version, reasons=[_schema_reason(e) for e in errors[:5]])
    timestamp = parse_timestamp(doc["timestamp"])
    if timestamp is None:
        return _rejected(
            ReasonCode.INVALID_TIMESTAMP, f"timestamp {doc['timestamp']!r}", kind, version
        )
    identifiers = extract_identifiers(doc)
    if not identifiers:
        return _rejected(
            ReasonCode.MISSING_IDENTIFIER,
            "no userId, anonymousId, email or phone in the event",
            kind,
            version,
        )
    return ContractResult(kind, version, doc, timestamp, identifiers, [])
