"""The whole stage chain over micro-batches, without a broker: outcomes, outputs, idempotency."""

import orjson
import pytest

from pipelines import topics
from pipelines.pipeline import SourceRecord


def order(make_event, order_id, total, currency="EUR", **fields):
    props = {"order_id": order_id, "total": total, "currency": currency}
    return make_event("track", event="Order Completed", properties=props, **fields)


def test_every_event_gets_exactly_one_outcome(run, make_event):
    report = run.feed(
        make_event("page", anonymousId="a1", context={"location": {"country": "US"}}),
        make_event("page", anonymousId="a2", context={"location": {"country": "FR"}}),
        order(make_event, "o1", 10, userId="u1"),
        b"{not json",
        b"\xff\xfe\x00",
    )
    assert dict(report.outcomes) == {"applied": 2, "withheld": 1, "rejected": 2}
    lineage = [orjson.loads(o.value) for o in run.on(topics.LINEAGE)]
    assert [e["decision"] for e in lineage] == ["allowed", "withheld", "allowed"]
    dead = run.on(topics.REJECTED)
    assert [o.value for o in dead] == [b"{not json", b"\xff\xfe\x00"]  # original bytes
    headers = dict(dead[0].headers)
    assert headers["tessera.reason"] == b"malformed_json"
    assert headers["tessera.source.topic"] == topics.BEHAVIORAL.encode()
    assert headers["tessera.source.offset"] == b"3"


def test_replaying_a_batch_is_a_no_op(run, make_event):
    events = [make_event("identify", userId="u1", traits={"email": "a@b.co"}), b"garbage"]
    run.feed(*events)
    before = len(run.outputs)
    again = run.feed(*events)
    assert again.received == 0 and again.duplicates == 2
    assert len(run.outputs) == before


def test_reused_message_id_with_other_content_is_rejected_not_lost(run, make_event):
    first = make_event("page", userId="u1", context={"location": {"country": "US"}})
    clash = {**first, "name": "different page"}
    report = run.feed(first, clash)
    assert dict(report.outcomes) == {"applied": 1, "rejected": 1}
    assert dict(run.on(topics.REJECTED)[0].headers)["tessera.reason"] == b"duplicate_event_id"


def test_profile_aggregates_orders_refunds_tickets_and_traits(run, make_event):
    run.feed(
        make_event(
            "identify",
            userId="u1",
            traits={"email": "ann@x.com", "first_name": "Ann"},
            timestamp="2026-10-01T09:00:00Z",
        ),
        order(make_event, "o1", 100.10, userId="u1"),
        order(make_event, "o1", 100.10, userId="u1"),  # re-sent order, new messageId
        order(make_event, "o2", 5, currency="USD", userId="u1"),
        make_event(
            "track",
            event="Order Refunded",
            userId="u1",
            properties={"order_id": "o1", "total": 20.05, "currency": "EUR"},
        ),
        make_event("track", event="Ticket Opened", userId="u1", properties={"ticket_id": "t1"}),
        make_event("track", event="Ticket Opened", userId="u1", properties={"ticket_id": "t2"}),
        make_event("track", event="Ticket Closed", userId="u1", properties={"ticket_id": "t1"}),
        make_event(
            "track", event="CSAT Submitted", userId="u1", properties={"ticket_id": "t1", "score": 4}
        ),
        make_event(
            "identify", userId="u1", traits={"first_name": "Anne"}, timestamp="2026-10-02T09:00:00Z"
        ),
    )
    (profile,) = run.latest_profiles().values()
    computed = profile["computed"]
    assert computed["order_count"] == 2
    assert computed["refund_count"] == 1
    assert computed["lifetime_value"] == {"EUR": 80.05, "USD": 5.0}
    assert computed["open_tickets"] == 1
    assert computed["last_csat"] == 4
    assert profile["traits"]["first_name"]["value"] == "Anne"  # latest wins
    assert profile["identifiers"] == {"email": ["ann@x.com"], "user_id": ["u1"]}


def test_merge_combines_histories_once_and_tombstones_the_merged_person(run, make_event):
    guest_order = make_event(
        "track",
        event="Order Completed",
        anonymousId="guest",
        timestamp="2026-09-01T10:00:00Z",
        properties={"order_id": "o1", "total": 10, "currency": "EUR", "email": "kim@x.com"},
    )
    run.feed(guest_order)
    run.feed(order(make_event, "o2", 15, userId="kim", timestamp="2026-09-02T10:00:00Z"))
    guest_person = next(iter(run.latest_profiles()))
    report = run.feed(
        make_event(
            "identify",
            userId="kim",
            traits={"email": "KIM@x.com"},
            timestamp="2026-09-03T10:00:00Z",
        )
    )
    assert report.merges == 1
    profiles = run.latest_profiles()
    assert list(profiles) == [guest_person]  # the older person's id survives
    merged = profiles[guest_person]
    assert merged["computed"]["order_count"] == 2
    assert merged["computed"]["lifetime_value"] == {"EUR": 25.0}
    assert len(merged["merged_from"]) == 1
    tombstones = [o.key for o in run.on(topics.PROFILES_CHANGELOG) if o.value is None]
    assert [t.decode() for t in tombstones] == merged["merged_from"]


def test_withheld_events_leave_no_trace_in_profiles(run, make_event):
    run.feed(
        make_event("identify", userId="eu1", traits={"email": "e@x.eu"}),
        make_event(
            "page",
            userId="eu1",
            context={
                "location": {"country": "DE"},
                "consent": {"categoryPreferences": {"analytics": False}},
            },
        ),
    )
    (profile,) = run.latest_profiles().values()
    assert profile["computed"]["event_count"] == 1


def test_a_failed_emit_rolls_back_so_the_batch_can_be_retried(run, make_event):
    event = make_event("identify", userId="u1")

    def broken(_outputs):
        raise RuntimeError("broker unavailable")

    with pytest.raises(RuntimeError):
        run.pipeline.process([SourceRecord(topics.BEHAVIORAL, 0, 0, orjson.dumps(event))], broken)
    report = run.feed(event)
    assert report.outcomes["applied"] == 1 and report.duplicates == 0
    assert run.pipeline.committed_offsets()[(topics.BEHAVIORAL, 0)] == 1


def test_an_operator_split_rebuilds_both_profiles_and_bad_commands_are_dead_letters(
    run, make_event
):
    from pipelines.identity_commands import reject_link_command

    us = {"location": {"country": "US"}}
    run.feed(make_event("identify", anonymousId="dev-9", traits={"email": "fam@x.com"}, context=us))
    run.feed(order(make_event, "o1", 10, userId="u2", context=us))
    run.feed(make_event("identify", userId="u2", traits={"email": "fam@x.com"}, context=us))
    (merged,) = run.latest_profiles().values()  # the shared inbox made them one
    assert merged["computed"]["order_count"] == 1 and len(merged["merged_from"]) == 1
    links = [orjson.loads(o.value) for o in run.on(topics.IDENTITY_LINKS)]
    (merge,) = [e for e in links if e["kind"] == "merge"]
    assert merge["rule"] == "shared:email"
    command = reject_link_command(
        merge["detail"]["record_l"], merge["detail"]["record_r"], "shared inbox", "ops"
    )
    report = run.feed(command.value, topic=topics.IDENTITY_COMMANDS)
    assert dict(report.outcomes) == {"applied": 1}
    after = [orjson.loads(o.value) for o in run.on(topics.IDENTITY_LINKS)]
    assert [e["kind"] for e in after[len(links) :]] == ["link_rejected", "split"]
    profiles = run.latest_profiles()
    # Both persons are back under the two ids the merge joined (which of them survived the
    # merge depends on the record ids: the three events share one timestamp).
    assert set(profiles) == {merge["person_id"], merge["other_person_id"]}
    by_identifier = {
        ids[0]: doc
        for doc in profiles.values()
        for ids in (doc["identifiers"].get("anonymous_id") or doc["identifiers"]["user_id"],)
    }
    assert by_identifier["dev-9"]["computed"]["order_count"] == 0
    assert by_identifier["u2"]["computed"]["order_count"] == 1
    assert "user_id" not in by_identifier["dev-9"]["identifiers"]
    assert not any(doc["merged_from"] for doc in profiles.values())
    bad = run.feed(
        orjson.dumps({"command": "reject_link", "command_id": "c1"}),
        b"\x00garbage",
        topic=topics.IDENTITY_COMMANDS,
    )
    assert dict(bad.outcomes) == {"rejected": 2}
    reasons = [dict(o.headers)["tessera.reason"] for o in run.on(topics.REJECTED)]
    assert reasons == [b"invalid_command", b"invalid_command"]
    assert run.feed(command.value, topic=topics.IDENTITY_COMMANDS).duplicates == 1


def test_offsets_per_partition_only_move_forward_and_the_journal_holds_the_last_batch(
    run, make_event
):
    def at(topic, partition, offset, user):
        return SourceRecord(topic, partition, offset, orjson.dumps(make_event("page", userId=user)))

    def committed_after(batch):
        run.pipeline.process(batch, lambda _outputs: None)
        return run.pipeline.committed_offsets()

    first = [
        at(topics.BEHAVIORAL, 0, 7, "u1"),
        at(topics.BEHAVIORAL, 2, 3, "u2"),
        at(topics.BEHAVIORAL, 0, 5, "u3"),
        at(topics.TRANSACTIONAL, 1, 40, "u4"),
    ]
    assert committed_after(first) == {
        (topics.BEHAVIORAL, 0): 8,
        (topics.BEHAVIORAL, 2): 4,
        (topics.TRANSACTIONAL, 1): 41,
    }
    # A later batch with a redelivered, older offset of one partition and a new partition.
    later = [at(topics.BEHAVIORAL, 0, 2, "u5"), at(topics.BEHAVIORAL, 3, 0, "u6")]
    assert committed_after(later) == {
        (topics.BEHAVIORAL, 0): 8,
        (topics.BEHAVIORAL, 2): 4,
        (topics.BEHAVIORAL, 3): 1,
        (topics.TRANSACTIONAL, 1): 41,
    }
    journal = run.pipeline.conn.execute("SELECT slot, extent FROM batch_journal").fetchall()
    assert [(slot, orjson.loads(extent)) for slot, extent in journal] == [
        (0, [[topics.BEHAVIORAL, 0, 2, 2], [topics.BEHAVIORAL, 3, 0, 0]])
    ]
    # Only stored partitions (their rows updated in place): the older offset stays behind.
    again = [at(topics.BEHAVIORAL, 0, 6, "u7"), at(topics.BEHAVIORAL, 2, 9, "u8")]
    assert committed_after(again) == {
        (topics.BEHAVIORAL, 0): 8,
        (topics.BEHAVIORAL, 2): 10,
        (topics.BEHAVIORAL, 3): 1,
        (topics.TRANSACTIONAL, 1): 41,
    }
