from datetime import UTC, datetime, timedelta

from identity.graph import IdentityGraph, person_id_for
from identity.normalise import Identifier
from pipelines.pipeline import open_state

T0 = datetime(2026, 10, 1, tzinfo=UTC)


def uid(v):
    return Identifier("user_id", v)


def anon(v):
    return Identifier("anonymous_id", v)


def email(v):
    return Identifier("email", v)


def item(key, minutes, *ids):
    return (key, T0 + timedelta(minutes=minutes), list(ids))


def graph():
    return IdentityGraph(open_state(":memory:"))


def test_anonymous_then_identify_is_one_person_with_the_first_id():
    g = graph()
    first = g.resolve([item("e1", 0, anon("a1"))])
    second = g.resolve([item("e2", 5, uid("u1"), anon("a1"))])
    assert first.person_of == [person_id_for("e1")]
    assert second.person_of == [person_id_for("e1")]
    assert g.person_of(uid("u1")) == person_id_for("e1")


def test_two_persons_merge_into_the_older_and_the_merge_is_logged():
    g = graph()
    g.resolve([item("new", 50, email("x@y.com"))])  # processed first, but happened later
    g.resolve([item("old", 10, uid("u1"))])
    result = g.resolve([item("joins", 60, uid("u1"), email("x@y.com"))])
    assert result.person_of == [person_id_for("old")]
    assert result.merged == {person_id_for("new"): person_id_for("old")}
    merges = [e for e in result.log if e["kind"] == "merge"]
    assert merges[0]["other_person_id"] == person_id_for("new")
    assert g.person_of(email("x@y.com")) == person_id_for("old")


def test_shared_device_does_not_merge_two_registered_people():
    g = graph()
    g.resolve([item("a", 0, uid("alice"), anon("tablet"))])
    result = g.resolve([item("b", 5, uid("bob"), anon("tablet"))])
    assert result.person_of == [person_id_for("b")]
    assert not result.merged
    assert [e["kind"] for e in result.log] == ["conflict", "person_created"]
    assert g.person_of(anon("tablet")) == person_id_for("a")


def test_event_goes_to_the_person_of_its_strongest_identifier():
    g = graph()
    g.resolve([item("a", 0, uid("alice"), anon("d1"))])
    g.resolve([item("b", 1, uid("bob"), email("bob@x.com"))])
    result = g.resolve([item("c", 2, anon("d1"), email("bob@x.com"))])
    assert result.person_of == [person_id_for("b")]  # email outranks a device id
    assert not result.merged


def test_limits_stop_a_chain_of_merges_inside_one_batch():
    g = graph()
    result = g.resolve(
        [
            item("1", 0, uid("u1"), anon("d")),
            item("2", 1, uid("u2"), email("e@x.com")),
            item("3", 2, anon("d"), email("e@x.com")),
            item("4", 3, anon("d")),
        ]
    )
    assert result.person_of == [
        person_id_for("1"),
        person_id_for("2"),
        person_id_for("2"),
        person_id_for("1"),
    ]
    assert not result.merged


def test_chained_merges_in_one_batch_resolve_to_the_final_survivor():
    g = graph()
    result = g.resolve(
        [
            item("p1", 0, anon("a")),
            item("p2", 1, anon("b")),
            item("p3", 2, anon("c")),
            item("j1", 3, anon("b"), anon("c")),
            item("j2", 4, anon("a"), anon("b")),
        ]
    )
    survivor = person_id_for("p1")
    assert set(result.person_of) == {survivor}
    assert result.merged == {person_id_for("p2"): survivor, person_id_for("p3"): survivor}


def test_replaying_the_same_events_changes_nothing():
    g = graph()
    g.resolve([item("e1", 0, anon("a1")), item("e2", 1, uid("u1"), anon("a1"))])
    again = g.resolve([item("e1", 0, anon("a1")), item("e2", 1, uid("u1"), anon("a1"))])
    assert set(again.person_of) == {person_id_for("e1")}
    assert not again.merged and not again.touched
