import orjson
import pytest

from quality.reasons import ReasonCode
from schemas.contract import MAX_PAYLOAD_BYTES, check_contract
from schemas.registry import default_registry, kind_of


def raw(doc) -> bytes:
    return orjson.dumps(doc)


def test_every_kind_has_a_compiled_contract():
    assert default_registry().kinds() == sorted(
        [
            "alias",
            "consent_change",
            "csat_submitted",
            "identify",
            "order_completed",
            "order_refunded",
            "page",
            "screen",
            "ticket_closed",
            "ticket_opened",
            "track",
        ]
    )


def test_a_valid_order_passes_with_kind_and_utc_timestamp(make_event):
    event = make_event(
        "track",
        event="Order Completed",
        userId="u1",
        properties={"order_id": "o1", "total": 10.5, "currency": "EUR"},
        timestamp="2026-10-01T12:00:00+02:00",
    )
    result = check_contract(raw(event))
    assert result.ok, result.reasons
    assert result.kind == "order_completed"
    assert result.timestamp.isoformat() == "2026-10-01T10:00:00+00:00"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", ReasonCode.EMPTY_PAYLOAD),
        (b"   ", ReasonCode.EMPTY_PAYLOAD),
        (b"\t\r\n", ReasonCode.EMPTY_PAYLOAD),
        (b"\x0b\x0c ", ReasonCode.EMPTY_PAYLOAD),  # blank, though not JSON whitespace
        (b"\xff", ReasonCode.INVALID_UTF8),
        (b" \n\xed\xa0\x80", ReasonCode.INVALID_UTF8),  # a lone surrogate, UTF-8 encoded
        (b'{"type": "page", "x": "\xff\xfe"}', ReasonCode.INVALID_UTF8),
        (b'{"type": "page",', ReasonCode.MALFORMED_JSON),
        (b"[1, 2, 3]", ReasonCode.NOT_AN_OBJECT),
        (b'"just a string"', ReasonCode.NOT_AN_OBJECT),
        (b'{"a":' * 40 + b"1" + b"}" * 40, ReasonCode.TOO_DEEPLY_NESTED),
        (b"[" * 5000 + b"]" * 5000, ReasonCode.TOO_DEEPLY_NESTED),
        (b'{"type": "telemetry", "messageId": "x"}', ReasonCode.UNKNOWN_EVENT_TYPE),
        (b'{"messageId": "x"}', ReasonCode.UNKNOWN_EVENT_TYPE),
        (
            b'{"type": "page", "messageId": "x", "schemaVersion": 9}',
            ReasonCode.UNKNOWN_SCHEMA_VERSION,
        ),
        (
            b'{"type": "page", "messageId": "x", "schemaVersion": "1"}',
            ReasonCode.UNKNOWN_SCHEMA_VERSION,
        ),
        (
            b'{"type": "page", "anonymousId": "a", "timestamp": "2026-10-01T10:00:00Z"}',
            ReasonCode.MISSING_REQUIRED_FIELD,
        ),
        (
            b'{"type": "page", "messageId": 42, "anonymousId": "a", "timestamp": "2026-10-01T10:00:00Z"}',
            ReasonCode.WRONG_TYPE,
        ),
        (
            b'{"type": "page", "messageId": "x", "anonymousId": "a", "timestamp": "yesterday"}',
            ReasonCode.INVALID_VALUE,
        ),
        (
            b'{"type": "page", "messageId": "x", "anonymousId": "a", "timestamp": "2026-13-45T10:00:00Z"}',
            ReasonCode.INVALID_TIMESTAMP,
        ),
        (
            b'{"type": "page", "messageId": "x", "timestamp": "2026-10-01T10:00:00Z"}',
            ReasonCode.MISSING_IDENTIFIER,
        ),
        (
            b'{"type": "page", "messageId": "x", "anonymousId": "  ", "timestamp": "2026-10-01T10:00:00Z",'
            b' "context": {"traits": {"email": "n/a"}}}',
            ReasonCode.MISSING_IDENTIFIER,
        ),
    ],
)
def test_bad_input_gets_its_reason(payload, code):
    result = check_contract(payload)
    assert not result.ok
    assert result.reasons[0].code == code, result.reasons


def test_oversized_payload_is_rejected_before_parsing():
    payload = b'{"type": "page", "pad": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
    result = check_contract(payload)
    assert result.reasons[0].code == ReasonCode.PAYLOAD_TOO_LARGE
    assert str(len(payload)) in result.reasons[0].detail


def test_order_rules_wrong_type_and_bad_values(make_event):
    def order(**props):
        base = {"order_id": "o1", "total": 10, "currency": "EUR"}
        return raw(
            make_event("track", event="Order Completed", userId="u", properties={**base, **props})
        )

    assert check_contract(order(total="10.00")).reasons[0].code == ReasonCode.WRONG_TYPE
    assert check_contract(order(total=-1)).reasons[0].code == ReasonCode.INVALID_VALUE
    assert check_contract(order(currency="euro")).reasons[0].code == ReasonCode.INVALID_VALUE
    details = " ".join(r.detail for r in check_contract(order(total="x")).reasons)
    assert "properties/total" in details


def test_injection_strings_are_just_data(make_event):
    nasty = "'; DROP TABLE profiles; -- <script>alert(1)</script> \u0000 {{7*7}}"
    result = check_contract(raw(make_event("page", name=nasty, anonymousId="a-1")))
    assert result.ok and result.event["name"] == nasty


def test_unknown_track_events_use_the_generic_track_contract():
    assert kind_of({"type": "track", "event": "Product Viewed"}) == "track"
    assert kind_of({"type": "track", "event": "Order Completed"}) == "order_completed"
    assert kind_of({"type": "nope"}) is None


def test_a_rejection_names_the_contract_only_once_the_kind_is_known(make_event):
    # A dead letter's schema header comes from the result's kind and version.
    no_ids = make_event("page", name="/home")
    no_ids.pop("anonymousId", None)
    no_ids.pop("userId", None)
    late = check_contract(raw(no_ids))
    assert late.reasons[0].code == ReasonCode.MISSING_IDENTIFIER
    assert (late.kind, late.version) == ("page", 1)
    early = check_contract(b'{"type": "telemetry", "messageId": "x"}')
    assert (early.kind, early.version, early.event) == (None, None, None)
