"""Topic names and input routing. The only place topic names are spelled."""

from dataclasses import dataclass

import orjson

BEHAVIORAL = "tessera.events.behavioral"
TRANSACTIONAL = "tessera.events.transactional"
SUPPORT = "tessera.events.support"
CONSENT = "tessera.consent.changes"
PRIVACY = "tessera.privacy.requests"
IDENTITY_COMMANDS = "tessera.identity.commands"  # operator decisions: reject a link

REJECTED = "tessera.events.rejected"
LINEAGE = "tessera.lineage"
IDENTITY_LINKS = "tessera.identity.links"
PROFILES_CHANGELOG = "tessera.profiles.changelog"
QUALITY_REPORTS = "tessera.quality.reports"  # one record per batch: counts, alerts, GX summary
ERASURES = "tessera.privacy.erasures"  # erasure certificates by request id (no PII)
# Internal, one partition: bundles of raw input records that ingest workers forward to the
# stage owner when many workers share the input partitions (pipelines/ingest.py).
STAGE_INPUT = "tessera.stages.input"
SEGMENT_CHANGES = "tessera.segments.changes"  # a person entering or leaving a segment

INPUT_TOPICS: tuple[str, ...] = (BEHAVIORAL, TRANSACTIONAL, SUPPORT, CONSENT)
# Everything the worker consumes: events, operators' identity decisions, privacy requests.
WORKER_TOPICS: tuple[str, ...] = (*INPUT_TOPICS, IDENTITY_COMMANDS, PRIVACY)
# What the event stream produces (every engine, byte for byte the same: engine parity).
OUTPUT_TOPICS: tuple[str, ...] = (
    REJECTED,
    LINEAGE,
    IDENTITY_LINKS,
    PROFILES_CHANGELOG,
    QUALITY_REPORTS,
    SEGMENT_CHANGES,
)
# What privacy requests produce besides lineage, links and tombstones: certificates.
PRIVACY_OUTPUT_TOPICS: tuple[str, ...] = (ERASURES,)


@dataclass(frozen=True)
class TopicSpec:
    """How a topic is created: partitions and whether it is compacted (latest value per key)."""

    name: str
    partitions: int = 1
    compacted: bool = False


def topic_specs(partitions: int = 1) -> list[TopicSpec]:
    """Every topic Tessera uses; input topics get `partitions` partitions."""
    specs = [TopicSpec(name, partitions) for name in (*INPUT_TOPICS, PRIVACY)]
    specs.append(TopicSpec(IDENTITY_COMMANDS))  # one partition: decisions apply in order
    specs += [TopicSpec(REJECTED), TopicSpec(LINEAGE), TopicSpec(IDENTITY_LINKS)]
    specs.append(TopicSpec(PROFILES_CHANGELOG, compacted=True))
    specs.append(TopicSpec(QUALITY_REPORTS))
    specs.append(TopicSpec(ERASURES))
    specs.append(TopicSpec(STAGE_INPUT))  # one partition: one stage owner, one order
    specs.append(TopicSpec(SEGMENT_CHANGES, compacted=True))
    return specs


TRANSACTIONAL_EVENTS = frozenset({"Order Completed", "Order Refunded"})
SUPPORT_EVENTS = frozenset({"Ticket Opened", "Ticket Closed", "CSAT Submitted"})


def route(raw: bytes) -> tuple[str, bytes | None]:
    """Pick the input topic and partition key for one raw event.

    Events that do not parse go to the behavioral topic unchanged: the contract stage
    there rejects them with a reason, so nothing is dropped at the producer.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return BEHAVIORAL, None
    if not isinstance(doc, dict):
        return BEHAVIORAL, None
    key = doc.get("userId") or doc.get("anonymousId")
    key_bytes = key.encode() if isinstance(key, str) else None
    if doc.get("type") == "consent":
        return CONSENT, key_bytes
    event = doc.get("event")
    if not isinstance(event, str):
        event = None  # a list or object here is garbage, and unhashable
    if doc.get("type") == "track" and event in TRANSACTIONAL_EVENTS:
        return TRANSACTIONAL, key_bytes
    if doc.get("type") == "track" and event in SUPPORT_EVENTS:
        return SUPPORT, key_bytes
    return BEHAVIORAL, key_bytes
