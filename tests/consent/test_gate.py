from datetime import UTC, datetime, timedelta

import duckdb
import orjson
import pytest

from consent.erasure import erasure_request
from consent.gate import ALLOWED, CONSENT_RECORDED, WITHHELD, ConsentGate, carried_preferences
from consent.policy import load_policy
from identity.normalise import Identifier
from pipelines import topics
from pipelines.pipeline import Pipeline, SourceRecord, open_state

A = Identifier("anonymous_id", "a1")
B = Identifier("user_id", "u1")


def at(hour: int) -> datetime:
    return datetime(2026, 10, 1, hour, tzinfo=UTC)


def gate():
    return ConsentGate(open_state(":memory:"), load_policy())


def consent(key, purpose, status, hour):
    event = {"type": "consent", "consent": {"purpose": purpose, "status": status, "source": "CMP"}}
    return (key, "consent_change", event, at(hour), [A])


def page(key, hour, country="DE", prefs=None):
    context = {"location": {"country": country}}
    if prefs is not None:
        context["consent"] = {"categoryPreferences": prefs}
    return (key, "page", {"type": "page", "context": context}, at(hour), [A])


def test_eu_default_denies_and_us_default_grants():
    decisions = gate().decide([page("e1", 1, "DE"), page("e2", 1, "US")])
    assert [d.decision for d in decisions] == [WITHHELD, ALLOWED]
    assert decisions[0].basis == "jurisdiction-default" and decisions[0].jurisdiction == "EU"


def test_carried_preferences_decide_and_are_remembered():
    g = gate()
    first = g.decide([page("e1", 1, prefs={"analytics": True})])[0]
    assert (first.decision, first.basis) == (ALLOWED, "event-preferences")
    later = g.decide([page("e2", 2)])[0]  # no preferences carried: the stored grant applies
    assert (later.decision, later.basis, later.consent_ref) == (ALLOWED, "stored-consent", "e1")


def test_withdrawal_then_events_are_withheld():
    g = gate()
    decisions = g.decide(
        [
            consent("c1", "analytics", "granted", 1),
            page("e1", 2),
            consent("c2", "analytics", "withdrawn", 3),
            page("e2", 4),
        ]
    )
    assert [d.decision for d in decisions] == [
        CONSENT_RECORDED,
        ALLOWED,
        CONSENT_RECORDED,
        WITHHELD,
    ]
    assert decisions[3].consent_ref == "c2"


def test_out_of_order_consent_resolves_by_timestamp():
    g = gate()
    g.decide([consent("late", "analytics", "withdrawn", 5)])
    g.decide([consent("early", "analytics", "granted", 1)])  # arrives later, happened earlier
    decision = g.decide([page("e1", 6)])[0]
    assert (decision.decision, decision.consent_ref) == (WITHHELD, "late")


def test_events_needing_no_consent_pass():
    d = gate().decide([("o1", "order_completed", {"type": "track"}, at(1), [A])])[0]
    assert (d.decision, d.purpose, d.basis) == (ALLOWED, None, "no-consent-needed")


def test_a_value_stored_under_another_type_is_not_the_subjects_consent():
    g = gate()
    user = Identifier("user_id", "a1")  # the same value as A, another identifier
    event = {
        "type": "consent",
        "consent": {"purpose": "analytics", "status": "denied", "source": "CMP"},
    }
    g.decide([("c1", "consent_change", event, at(1), [user])])
    g.decide([page("e1", 2, "US", prefs={"analytics": True})])  # A's own statement
    decision = g.decide([page("e2", 3, "DE")])[0]
    assert (decision.decision, decision.basis, decision.consent_ref) == (
        ALLOWED,
        "stored-consent",
        "e1",
    )
    rows = g.conn.execute(
        "SELECT id_type, status, event_key FROM consent_state WHERE purpose = 'analytics' ORDER BY 1"
    ).fetchall()
    assert rows == [("anonymous_id", "granted", "e1"), ("user_id", "denied", "c1")]


def test_restated_consent_replaces_its_row_in_later_batches():
    g = gate()
    prefs = {"analytics": True, "marketing": False}
    g.decide([page("e1", 1, prefs=prefs)])
    g.decide([page("e2", 3, prefs=prefs), page("e3", 2, prefs={"analytics": False})])
    rows = g.conn.execute(
        "SELECT purpose, status, event_key, hour(ts) FROM consent_state ORDER BY purpose"
    ).fetchall()
    # One row per subject and purpose: the latest statement (e3 happened before e2: it loses).
    assert rows == [("analytics", "granted", "e2", 3), ("marketing", "denied", "e2", 3)]
    assert g.last_changed == {A}


def test_carried_preferences_keep_only_booleans():
    prefs = {"analytics": True, "marketing": False}
    assert carried_preferences({"context": {"consent": {"categoryPreferences": prefs}}}) == prefs
    mixed = {"analytics": True, "marketing": "yes", "support": 1, "personalization": False}
    stated = carried_preferences({"context": {"consent": {"categoryPreferences": mixed}}})
    assert stated == {"analytics": True, "personalization": False}
    assert carried_preferences({"context": {"consent": {"categoryPreferences": ["x"]}}}) == {}


# -- the stored consent the gate keeps between batches ---------------------------------------


def test_kept_consent_is_bounded_and_decides_as_the_stored_state():
    g = ConsentGate(open_state(":memory:"), load_policy(), kept_values=2)
    subjects = [Identifier("anonymous_id", f"a{n}") for n in range(5)]
    for n, subject in enumerate(subjects):  # a grant each, then their kept rows dropped
        event = {
            "type": "page",
            "context": {"consent": {"categoryPreferences": {"analytics": True}}},
        }
        g.decide([(f"e{n}", "page", event, at(1), [subject])])
        assert len(g._keys_of) <= 2
    assert {i.value for i, _ in g._state} <= {"a3", "a4"}
    event = {"type": "page", "context": {"location": {"country": "DE"}}}
    decisions = g.decide([(f"d{n}", "page", event, at(2), [s]) for n, s in enumerate(subjects)])
    assert [(d.decision, d.consent_ref) for d in decisions] == [
        (ALLOWED, f"e{n}") for n in range(5)
    ]


def test_restated_consent_keeps_one_row_per_key_as_values_are_dropped_and_read_again():
    # No index guards the key: the gate writes each value's rows whole from one record per key.
    g = ConsentGate(open_state(":memory:"), load_policy(), kept_values=1)
    both = [A, B, Identifier("user_id", "a1")]  # "a1" under two types: two values' keys
    for hour in range(1, 7):
        prefs = {"analytics": hour % 2 == 0, "marketing": True}
        ids = both if hour % 3 else [A]
        g.decide([(*page(f"e{hour}", hour, prefs=prefs)[:4], ids)])
        g.decide([(*page(f"x{hour}", hour, prefs={"support": True})[:4], [B])])  # drops a1
    rows = g.conn.execute(
        "SELECT id_type, id_value, purpose, status, event_key FROM consent_state ORDER BY ALL"
    ).fetchall()
    assert rows == [
        ("anonymous_id", "a1", "analytics", "granted", "e6"),
        ("anonymous_id", "a1", "marketing", "granted", "e6"),
        ("user_id", "a1", "analytics", "denied", "e5"),
        ("user_id", "a1", "marketing", "granted", "e5"),
        ("user_id", "u1", "analytics", "denied", "e5"),
        ("user_id", "u1", "marketing", "granted", "e5"),
        ("user_id", "u1", "support", "granted", "x6"),
    ]


def test_a_consent_state_stored_with_a_primary_key_is_rewritten_once_without_it(tmp_path):
    path = str(tmp_path / "state.duckdb")
    conn = duckdb.connect(path)
    conn.execute(
        """CREATE TABLE consent_state (
            id_type VARCHAR, id_value VARCHAR, purpose VARCHAR,
            status VARCHAR, ts TIMESTAMPTZ, source VARCHAR, policy_version VARCHAR,
            jurisdiction VARCHAR, event_key VARCHAR, PRIMARY KEY (id_type, id_value, purpose))"""
    )
    conn.execute(
        "INSERT INTO consent_state VALUES ('anonymous_id', 'a1', 'analytics', 'denied', "
        "'2026-10-01 01:00:00+00', 'CMP', 'v1', 'EU', 'c1')"
    )
    stored = conn.execute("SELECT * FROM consent_state").fetchall()
    keys = (
        "SELECT count(*) FROM duckdb_constraints() "
        "WHERE table_name = 'consent_state' AND constraint_type = 'PRIMARY KEY'"
    )
    g = ConsentGate(conn, load_policy())
    assert conn.execute(keys).fetchone() == (0,)
    assert conn.execute("SELECT * FROM consent_state").fetchall() == stored
    decision = g.decide([page("e1", 2)])[0]  # decided by the rewritten table's row
    assert (decision.decision, decision.basis, decision.consent_ref) == (
        WITHHELD,
        "stored-consent",
        "c1",
    )
    ConsentGate(conn, load_policy())  # opened again: nothing to rewrite
    assert conn.execute("SELECT count(*) FROM consent_state").fetchone() == (1,)


PAST = datetime(2026, 10, 1, tzinfo=UTC)


def _event(message_id: str, minute: int, country: str = "DE", **fields) -> dict:
    return {
        "type": "page",
        "messageId": message_id,
        "userId": "u1",
        "timestamp": (PAST + timedelta(minutes=minute)).isoformat(),
        "context": {"location": {"country": country}},
        **fields,
    }


def _grant(message_id: str, minute: int) -> dict:
    return {
        "type": "consent",
        "messageId": message_id,
        "userId": "u1",
        "timestamp": (PAST + timedelta(minutes=minute)).isoformat(),
        "consent": {"purpose": "analytics", "status": "granted", "source": "cmp"},
    }


class Feed:
    """A pipeline over real state, fed batches of events; each event's lineage entry."""

    def __init__(self, path) -> None:
        self.pipeline = Pipeline(path / "state.duckdb", quality=False)
        self.offset = 0
        self.lineage: dict[str, dict] = {}

    def __call__(self, *events: dict, topic: str = topics.BEHAVIORAL, emit=None) -> None:
        batch = []
        for event in events:
            batch.append(SourceRecord(topic, 0, self.offset, orjson.dumps(event)))
            self.offset += 1

        def keep(outputs):
            for o in outputs:
                if o.topic == topics.LINEAGE:
                    entry = orjson.loads(o.value)
                    self.lineage[entry["event_key"]] = entry

        self.pipeline.process(batch, emit or keep)

    def decided(self, key: str) -> tuple[str, str]:
        return self.lineage[key]["decision"], self.lineage[key]["basis"]


def test_consent_of_a_rolled_back_batch_does_not_decide_later_ones(tmp_path):
    feed = Feed(tmp_path)
    feed(_event("p0", 0, "US"))  # the subject is known, nothing consented

    def broker_down(_outputs):
        raise ConnectionError("broker unreachable")

    with pytest.raises(ConnectionError):  # the grant's batch is rolled back
        feed(_grant("c1", 1), topic=topics.CONSENT, emit=broker_down)
    feed(_event("p1", 2))
    # The state holds no grant: the jurisdiction's default (EU: analytics denied) decides.
    assert feed.decided("p1") == ("withheld", "jurisdiction-default")
    feed.pipeline.close()


def test_consent_erased_with_its_subject_does_not_decide_later_events(tmp_path):
    feed = Feed(tmp_path)
    feed(_event("p0", 0, "US"), _grant("c1", 1))
    feed(_event("p1", 2))
    assert feed.decided("p1") == ("allowed", "stored-consent")
    request = erasure_request(Identifier("user_id", "u1"), "test")
    request["requested_at"] = (PAST + timedelta(minutes=10)).isoformat()
    feed(request, topic=topics.PRIVACY)
    feed(_event("p2", 5), _event("p3", 20))
    # Before the erasure: the erased subject's; after it: a new start, nothing consented.
    assert feed.decided("p2") == ("withheld", "erased-subject")
    assert feed.decided("p3") == ("withheld", "jurisdiction-default")
    feed.pipeline.close()


@pytest.mark.parametrize("order", [(A, B), (B, A)])
def test_equally_recent_statements_under_two_identifiers_resolve_to_the_refusal(order):
    g = gate()
    granted = ("c1", "consent_change", consent("c1", "analytics", "granted", 1)[2], at(1), [A])
    denied = ("c2", "consent_change", consent("c2", "analytics", "denied", 1)[2], at(1), [B])
    g.decide([granted, denied])
    event = ("e1", "page", {"type": "page", "context": {}}, at(2), list(order))
    decision = g.decide([event])[0]
    assert (decision.decision, decision.consent_ref) == (WITHHELD, "c2")
