from datetime import UTC, datetime

from consent.gate import ALLOWED, CONSENT_RECORDED, WITHHELD, ConsentGate
from consent.policy import load_policy
from identity.normalise import Identifier
from pipelines.pipeline import open_state

A = Identifier("anonymous_id", "a1")


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
