import pytest

from consent.policy import PolicyError, load_policy
from schemas.registry import default_registry


def test_shipped_policy_covers_every_contract():
    policy = load_policy(known_kinds=set(default_registry().kinds()))
    assert policy.purpose_for("page") == "analytics"
    assert policy.purpose_for("order_completed") is None
    assert policy.jurisdiction_of("de") == "EU"
    assert policy.jurisdiction_of("US") == "US"
    assert policy.jurisdiction_of(None) == "default"
    assert policy.default_status("EU", "analytics") == "denied"
    assert policy.default_status("US", "analytics") == "granted"


def test_a_bad_policy_lists_every_problem(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        "purposes: {analytics: x}\n"
        "events: {page: analytics, track: marketing}\n"
        "jurisdictions:\n  default: {defaults: {analytics: maybe}}\n"
    )
    with pytest.raises(PolicyError) as err:
        load_policy(path, known_kinds={"page", "track", "identify"})
    message = str(err.value)
    assert "events.track: unknown purpose 'marketing'" in message
    assert "events.identify: missing" in message
    assert "'maybe' is not one of" in message


def test_unreadable_policy_says_which_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read purpose policy"):
        load_policy(tmp_path / "absent.yaml")


def test_a_country_named_twice_belongs_to_the_first_jurisdiction(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        "purposes: {analytics: x}\n"
        "events: {page: analytics}\n"
        "jurisdictions:\n"
        "  EU: {countries: [DE, CH], defaults: {analytics: denied}}\n"
        "  DACH: {countries: [CH, AT], defaults: {analytics: granted}}\n"
        "  default: {defaults: {analytics: denied}}\n"
    )
    policy = load_policy(path)
    assert policy.jurisdiction_of(" ch ") == "EU"
    assert policy.jurisdiction_of("at") == "DACH"
    assert policy.jurisdiction_of("ZZ") == policy.jurisdiction_of("") == "default"
