"""Hostile and random input: never a crash, always exactly one outcome with a reason."""

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines import topics
from pipelines.topics import route
from quality.reasons import ReasonCode
from schemas.contract import check_contract

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
VALID = {
    "type": "track",
    "event": "Order Completed",
    "messageId": "m-1",
    "timestamp": "2026-10-01T10:00:00Z",
    "userId": "u-1",
    "properties": {"order_id": "o-1", "total": 10.0, "currency": "EUR"},
}
HOSTILE = [
    b"\x00" * 100,
    b"\xc3\x28",
    b'{"type": "page", "messageId": "\\ud800", "anonymousId": "a", "timestamp": "2026-10-01T10:00:00Z"}',
    b"{" * 100_000,
    b'{"type": "page"' + b", " * 50_000 + b"}",
    b'{"type": ["page"], "messageId": "x"}',
    b'{"type": "identify", "messageId": "x", "timestamp": "2026-10-01T10:00:00Z", "userId": "'
    + b"A" * 300
    + b'"}',
    b'{"__proto__": {"admin": true}, "type": "page"}',
    b"1e999999",
    b'{"type": "track", "event": "Order Completed", "messageId": "big", "userId": "u",'
    b' "timestamp": "2026-10-01T10:00:00Z",'
    b' "properties": {"order_id": "o", "currency": "EUR", "total": 123456789012345678901234567890}}',
    b'{"type": "page", "messageId": "x", "anonymousId": "a", "timestamp": "9999-12-31T23:59:59Z"}',
    b'{"type": "page", "messageId": "x", "anonymousId": "a", "timestamp": "2026-10-01T10:00:00Z",'
    b' "context": {"consent": {"categoryPreferences": {"analytics": "yes"}}}}',
]


@given(st.binary(max_size=2000))
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_bytes_never_crash_and_always_have_a_reason(payload):
    result = check_contract(payload)
    assert result.ok or result.reasons[0].code in ReasonCode


@given(json_values)
@settings(max_examples=500)
def test_arbitrary_json_never_crashes(value):
    result = check_contract(orjson.dumps(value))
    assert result.ok or result.reasons[0].code in ReasonCode


@given(st.sampled_from([*sorted(VALID), "properties.total", "properties.currency"]), json_values)
@settings(max_examples=500)
def test_a_valid_event_with_any_field_replaced_is_checked_not_crashed(field, value):
    event = orjson.loads(orjson.dumps(VALID))
    if field.startswith("properties."):
        event["properties"][field.split(".", 1)[1]] = value
    else:
        event[field] = value
    result = check_contract(orjson.dumps(event))
    if not result.ok:
        assert all(r.detail for r in result.reasons)


def test_hostile_corpus_through_the_pipeline_loses_nothing(run):
    report = run.feed(*HOSTILE)
    assert report.received == len(HOSTILE)
    dead = run.on(topics.REJECTED)
    lineage = run.on(topics.LINEAGE)
    assert len(dead) + len(lineage) == len(HOSTILE)
    assert {o.value for o in dead} <= set(HOSTILE)
    for record in dead:
        headers = dict(record.headers)
        assert headers["tessera.reason"].decode() in ReasonCode.__members__.values()


@given(st.lists(st.binary(max_size=300) | json_values.map(orjson.dumps), min_size=1, max_size=30))
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_random_batches_account_for_every_distinct_message(run, batch):
    before = len(run.outputs)
    report = run.feed(*batch)
    produced = run.outputs[before:]
    rejected = [o for o in produced if o.topic == topics.REJECTED]
    decided = [o for o in produced if o.topic == topics.LINEAGE]
    assert report.received + report.duplicates == len(batch)
    assert report.received == len(rejected) + len(decided)


@given(st.sampled_from(["type", "event", "userId", "anonymousId"]), json_values)
@settings(max_examples=300)
def test_routing_any_field_value_never_raises(field, value):
    event = {**VALID, field: value}
    topic, key = route(orjson.dumps(event))
    assert topic in topics.INPUT_TOPICS and (key is None or isinstance(key, bytes))


def test_free_form_properties_named_like_typed_fields_do_not_poison_a_batch(run, make_event):
    odd = make_event(
        "page",
        userId="u-odd",
        context={"location": {"country": "US"}},
        properties={"order_id": 1e308, "ticket_id": [], "currency": {"a": 1}, "total": "x"},
    )
    report = run.feed(odd, make_event("page", userId="u-next", context=odd["context"]))
    assert dict(report.outcomes) == {"applied": 2}


TEMPLATES = [
    VALID,
    {
        "type": "identify",
        "messageId": "i-1",
        "timestamp": "2026-10-01T10:00:00Z",
        "userId": "u-1",
        "traits": {"email": "a@b.co", "phone": "+14155552671"},
        "context": {"location": {"country": "US"}},
    },
    {
        "type": "track",
        "event": "CSAT Submitted",
        "messageId": "c-1",
        "timestamp": "2026-10-01T10:00:00Z",
        "userId": "u-1",
        "properties": {"ticket_id": "t-1", "score": 4, "email": "a@b.co"},
    },
]
PATHS = [
    "timestamp",
    "userId",
    "properties.total",
    "properties.currency",
    "properties.email",
    "properties.phone",
    "properties.score",
    "properties.order_id",
    "traits.email",
    "traits.phone",
    "context.location.country",
]


@given(
    st.lists(
        st.tuples(st.sampled_from(TEMPLATES), st.sampled_from(PATHS), json_values),
        min_size=1,
        max_size=8,
    )
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_field_of_a_valid_event_replaced_passes_contract_and_suites_without_a_crash(
    run, mutations
):
    batch = []
    for n, (template, path, value) in enumerate(mutations):
        event = orjson.loads(orjson.dumps(template))
        event["messageId"] = f"{template['messageId']}-{len(run.outputs)}-{n}"
        *parents, leaf = path.split(".")
        node = event
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[leaf] = value
        batch.append(orjson.dumps(event))
    before = len(run.outputs)
    report = run.feed(*batch, topic=topics.TRANSACTIONAL)
    assert report.received + report.duplicates == len(batch)
    dead = [o for o in run.outputs[before:] if o.topic == topics.REJECTED]
    for record in dead:
        # No event of these is a poison pill: a crash would show as internal_error.
        assert dict(record.headers)["tessera.reason"] != b"internal_error"
