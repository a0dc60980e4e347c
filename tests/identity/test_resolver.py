"""The incremental resolver on small hand-made cases, with a model trained by EM."""

from datetime import UTC, datetime, timedelta

import pytest

from identity.model import ScoringModel, records_table, train_model
from identity.records import normalise_record, record_id_of
from identity.resolver import IdentityResolver, person_id_for
from pipelines.pipeline import open_state
from synthetic.identities import identity_records

T0 = datetime(2026, 10, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def model() -> ScoringModel:
    rows = []
    for raw in identity_records(600, seed=11):
        record = normalise_record(raw)
        record["record_id"] = raw["record_id"]
        rows.append(record)
    settings, _ = train_model(records_table(rows))
    return ScoringModel(settings, threshold=0.99)


def rec(**fields):
    return normalise_record(fields)


class Resolver:
    """A resolver over a fresh state, fed one batch at a time like the pipeline feeds it."""

    def __init__(self, model=None):
        self.conn = open_state(":memory:")
        self.identity = IdentityResolver(self.conn, model)
        self.minutes = 0

    def feed(self, *records, key=None):
        items = []
        for record in records:
            self.minutes += 1
            items.append((key or f"e{self.minutes}", T0 + timedelta(minutes=self.minutes), record))
        self.conn.execute("BEGIN")
        result = self.identity.resolve(items)
        self.conn.execute("COMMIT")
        return result

    def person(self, record):
        return self.identity.person_of_record(record_id_of(record))


def test_anonymous_device_then_login_is_one_person_with_the_first_id():
    r = Resolver()
    first = r.feed(rec(anonymous_id="dev-1"), key="visit")
    second = r.feed(rec(anonymous_id="dev-1", user_id="u-1", email="Ada@Example.org"))
    assert first.person_of == [person_id_for("visit")]
    assert second.person_of == [person_id_for("visit")]
    assert [e["kind"] for e in second.log] == ["record_linked"]
    assert second.log[0]["rule"] == "shared:anonymous_id"


def test_two_persons_merge_into_the_older_and_ids_stay_stable():
    r = Resolver()
    r.feed(rec(email="x@y.com"), key="older")
    r.feed(rec(user_id="u-1"), key="newer")
    result = r.feed(rec(user_id="u-1", email="x@y.com"))
    assert result.merged == {person_id_for("newer"): person_id_for("older")}
    assert result.person_of == [person_id_for("older")]
    assert r.person(rec(user_id="u-1")) == person_id_for("older")
    (merge,) = [e for e in result.log if e["kind"] == "merge"]
    assert merge["other_person_id"] == person_id_for("newer")
    # A later event of either identifier keeps landing on the survivor.
    assert r.feed(rec(user_id="u-1", anonymous_id="d9")).person_of == [person_id_for("older")]


def test_shared_household_tablet_does_not_merge_two_registered_people():
    r = Resolver()
    r.feed(rec(user_id="alice", anonymous_id="tablet"), key="a")
    result = r.feed(rec(user_id="bob", anonymous_id="tablet"), key="b")
    assert result.person_of == [person_id_for("b")]
    assert not result.merged
    assert "conflict" in [e["kind"] for e in result.log]
    assert {e["rule"] for e in result.log if e["kind"] == "conflict"} == {"limit:user_id"}


def test_typo_in_name_with_the_same_phone_links(model):
    r = Resolver(model)
    r.feed(
        rec(
            first_name="Katherine", last_name="Brennan", phone="+353 87 123 4567", dob="1984-05-02"
        ),
        key="k",
    )
    result = r.feed(
        rec(first_name="Katharine", last_name="Brenan", phone="087 123 4567", country="IE")
    )
    assert result.person_of == [person_id_for("k")]


def test_typo_in_name_links_probabilistically_without_any_shared_identifier(model):
    r = Resolver(model)
    r.feed(
        rec(
            first_name="Jonathan",
            last_name="Meyer",
            dob="1985-03-02",
            address_line1="12 Linden Street",
            postcode="10115",
            city="Berlin",
            email="jon.meyer@web.de",
        ),
        key="j",
    )
    result = r.feed(
        rec(
            first_name="Jonathon",
            last_name="Meyer",
            dob="02/03/1985",
            address_line1="12 Linden St.",
            postcode="10115",
            city="Berlin",
        )
    )
    assert result.person_of == [person_id_for("j")]
    (link,) = [e for e in result.log if e["kind"] == "record_linked"]
    assert link["rule"] == "splink"
    evidence = link["detail"]["comparisons"]
    assert link["detail"]["match_probability"] >= 0.99
    assert evidence["dob"]["match_weight"] > 0  # the same date written two ways
    assert evidence["first_name"]["level"].startswith("Jaro-Winkler")


def test_twins_at_one_address_do_not_link(model):
    r = Resolver(model)
    shared = dict(
        last_name="Novak",
        dob="1999-07-14",
        address_line1="7 Mill Road",
        postcode="40210",
        city="Denver",
        country="US",
    )
    first = r.feed(rec(first_name="Anna", email="anna.novak7@gmail.com", **shared), key="anna")
    second = r.feed(rec(first_name="Maria", email="maria.novak3@icloud.com", **shared), key="maria")
    assert first.person_of == [person_id_for("anna")]
    assert second.person_of == [person_id_for("maria")]


def test_erasing_the_bridging_record_splits_the_persons_back_with_their_ids(model):
    r = Resolver(model)
    r.feed(rec(email="a@x.com", anonymous_id="d1"), key="a")
    r.feed(rec(phone="+14155552671", anonymous_id="d2"), key="b")
    bridge = rec(email="a@x.com", phone="+14155552671")
    merged = r.feed(bridge, key="bridge")
    assert merged.merged == {person_id_for("b"): person_id_for("a")}
    result = r.identity.erase_records([record_id_of(bridge)], "erasure-1", T0)
    assert r.person(rec(email="a@x.com", anonymous_id="d1")) == person_id_for("a")
    assert r.person(rec(phone="+14155552671", anonymous_id="d2")) == person_id_for("b")
    assert r.person(bridge) is None
    (split,) = [e for e in result.log if e["kind"] == "split"]
    assert (split["person_id"], split["other_person_id"]) == (
        person_id_for("a"),
        person_id_for("b"),
    )


def test_an_operator_rejecting_a_link_splits_the_person_and_it_stays_split():
    r = Resolver()
    r.feed(rec(user_id="u-1", email="shared@family.com"), key="one")
    joined = r.feed(rec(email="shared@family.com", anonymous_id="d2"), key="two")
    assert joined.person_of == [person_id_for("one")]
    (link,) = [e for e in joined.log if e["kind"] == "record_linked"]
    a, b = link["detail"]["record_l"], link["detail"]["record_r"]
    result = r.identity.reject_link(a, b, "family inbox", "cmd-1", T0)
    kinds = [e["kind"] for e in result.log]
    assert kinds == ["link_rejected", "split"]
    assert r.person(rec(email="shared@family.com", anonymous_id="d2")) == person_id_for("two")
    # The same evidence arriving again does not undo the operator's decision.
    again = r.feed(rec(email="shared@family.com", anonymous_id="d2", first_name="Al"))
    assert {e["rule"] for e in again.log if e["kind"] == "conflict"} == {"rejected_link"}
    assert not again.merged
    assert r.person(rec(email="shared@family.com", anonymous_id="d2")) == person_id_for("two")
    assert r.person(rec(user_id="u-1", email="shared@family.com")) == person_id_for("one")


def test_replaying_a_batch_changes_nothing(model):
    r = Resolver(model)
    batch = [rec(email="z@z.com", first_name="Zoë"), rec(email="z@z.com", user_id="u-z")]
    first = r.feed(*batch, key="z")
    again = r.feed(*batch, key="z")
    assert again.person_of == first.person_of
    assert not again.log and not again.merged


def test_raising_the_threshold_unmerges_what_only_weaker_links_held(model):
    r = Resolver(model)
    assert r.identity.apply_threshold("start", T0) is None  # first start: nothing to undo
    common = dict(
        last_name="Meyer", dob="1985-03-02", address_line1="12 Linden St", postcode="10115"
    )
    r.feed(rec(first_name="Jonathan", email="jon.meyer@web.de", **common), key="j")
    linked = r.feed(rec(first_name="Jonathon", **common), key="j2")
    assert linked.person_of == [person_id_for("j")]
    ((probability,),) = r.conn.execute(
        "SELECT match_probability FROM id_edges WHERE rule = 'splink'"
    ).fetchall()
    stricter = ScoringModel(model.model, threshold=(1 + probability) / 2)
    restarted = IdentityResolver(r.conn, stricter)
    r.conn.execute("BEGIN")
    result = restarted.apply_threshold("start", T0)
    r.conn.execute("COMMIT")
    assert result is not None
    assert [e["kind"] for e in result.log] == ["threshold_raised", "split"]
    assert restarted.person_of_record(record_id_of(rec(first_name="Jonathon", **common))) == (
        person_id_for("j2")
    )
    assert restarted.apply_threshold("start", T0) is None  # once per start


def test_a_mobile_device_id_links_the_anonymous_app_user_to_their_login():
    r = Resolver()
    r.feed(
        rec(anonymous_id="app-install-1", device_id="A1B2C3D4-0000-4000-8000-00000000AAAA"),
        key="open",
    )
    # A reinstall gives the app a new anonymous id; the device is the same.
    result = r.feed(rec(user_id="u-7", device_id="a1b2c3d4-0000-4000-8000-00000000aaaa"))
    assert result.person_of == [person_id_for("open")]
    assert [e["rule"] for e in result.log if e["kind"] == "record_linked"] == ["shared:device_id"]


def test_a_household_tablet_device_id_does_not_merge_its_two_users():
    r = Resolver()
    r.feed(rec(user_id="alice", device_id="tablet-1", advertising_id="ad-tablet"), key="a")
    result = r.feed(rec(user_id="bob", device_id="tablet-1", advertising_id="ad-tablet"), key="b")
    assert result.person_of == [person_id_for("b")]
    assert not result.merged
    assert {e["rule"] for e in result.log if e["kind"] == "conflict"} == {"limit:user_id"}


def test_the_zero_advertising_id_of_limited_ad_tracking_links_no_one():
    r = Resolver()
    zero = "00000000-0000-0000-0000-000000000000"
    assert rec(advertising_id=zero)["advertising_id"] is None
    r.feed(rec(email="one@x.com", advertising_id=zero), key="one")
    result = r.feed(rec(email="two@x.com", advertising_id=zero), key="two")
    assert result.person_of == [person_id_for("two")]
    assert not result.log[1:]  # created, nothing linked


def test_a_device_shared_by_more_persons_than_the_limit_stops_linking():
    r = Resolver()
    r.identity.limits["device_id"] = 2
    r.feed(rec(anonymous_id="v1", device_id="kiosk", advertising_id="ad-1"), key="first")
    r.feed(rec(anonymous_id="v2", device_id="phone-2", advertising_id="ad-1"), key="second")
    result = r.feed(rec(anonymous_id="v3", device_id="phone-3", advertising_id="ad-1"), key="third")
    assert result.person_of == [person_id_for("third")]
    assert {e["rule"] for e in result.log if e["kind"] == "conflict"} == {"limit:device_id"}


def test_records_without_device_ids_keep_the_content_address_they_always_had():
    import hashlib

    from identity.records import ATTRIBUTE_FIELDS

    fields = rec(email="old@x.com", first_name="Ada")
    before = ("user_id", "customer_id", "email", "phone", "anonymous_id", *ATTRIBUTE_FIELDS)
    body = "\x1f".join(fields.get(name) or "" for name in before)
    assert record_id_of(fields) == "r_" + hashlib.blake2b(body.encode(), digest_size=12).hexdigest()
    assert record_id_of(rec(email="old@x.com", first_name="Ada", device_id="d")) != record_id_of(
        fields
    )


def _merged_and_split(r: Resolver) -> None:
    """Feed 150 records in batches of 60 (merges among them), then split one link."""
    rows = [normalise_record(raw) for raw in identity_records(150, seed=5)]
    for start in range(0, len(rows), 60):
        r.feed(*rows[start : start + 60])
    r.identity.reject_link(*sorted(r.identity.index.person_of)[:2], "test", "cmd", T0)


def test_the_index_kept_in_memory_equals_the_index_rebuilt_from_the_store(model):
    """What a rollback or a restart rebuilds is what the batches maintained."""
    from identity.index import CandidateIndex

    r = Resolver(model)
    _merged_and_split(r)
    kept = r.identity.index
    rebuilt = CandidateIndex.load(r.conn, kept.rules, kept.tf_columns)
    assert len(set(kept.members)) < len(kept.person_of)  # some records were linked
    assert rebuilt.person_of == kept.person_of
    assert rebuilt.members == kept.members
    assert rebuilt.fields == kept.fields
    assert rebuilt.anchors == kept.anchors
    assert rebuilt.cannot == kept.cannot
    assert {p: b for p, b in rebuilt.born.items()} == kept.born
    assert [dict(b) for b in rebuilt.blocks] == [dict(b) for b in kept.blocks]
    assert r.identity.clusters() == kept.person_of


def test_weights_from_comparison_levels_equal_splinks_prediction_sql(model):
    """The resolver scores a batch from Splink's comparison levels and does Splink's
    arithmetic itself: every candidate pair must get the weight Splink's own SQL gives."""
    import duckdb
    import pyarrow as pa

    from identity.index import CandidateIndex

    records = {}
    for raw in identity_records(300, seed=5):
        fields = normalise_record(raw)
        records[record_id_of(fields)] = fields
    index = CandidateIndex(
        [("last_name",), ("postcode",), ("phone",)], model.tf_columns
    )  # broad blocks: many levels of every comparison
    index.add(records.items())
    pairs = sorted(index.candidate_pairs(dict(records.items())))
    ids = sorted(records)
    tf = {r: {c: index.term_frequency(c, records[r].get(c)) for c in model.tf_columns} for r in ids}
    table = {"record_id": ids}
    table |= {c: [records[r].get(c) for r in ids] for c in model.columns}
    table |= {f"tf_{c}": pa.array([tf[r][c] for r in ids], pa.float64()) for c in model.tf_columns}
    conn = duckdb.connect()
    conn.register("_recs", pa.table(table))
    conn.register(
        "_pairs",
        pa.table({"record_id_l": [p[0] for p in pairs], "record_id_r": [p[1] for p in pairs]}),
    )
    parts = ", ".join(
        f"mw_{c} + coalesce(mw_tf_adj_{c}, 0)" if c in model.tf_comparisons else f"mw_{c}"
        for c in model.comparisons
    )
    splink = {
        (row[0], row[1]): row[2:]
        for row in conn.execute(
            f"SELECT record_id_l, record_id_r, match_weight, match_probability, {parts} "
            f"FROM ({model.score_sql('_pairs', '_recs')})"
        ).fetchall()
    }
    levels = conn.execute(model.gamma_sql("_pairs", "_recs")).fetchall()
    assert len(levels) == len(pairs) > 1000
    linked = 0
    for left, right, *gammas in levels:
        weight, probability, by_comparison = model.weigh(
            dict(zip(model.comparisons, gammas, strict=True)), tf[left], tf[right]
        )
        expected = splink[(left, right)]
        assert weight == pytest.approx(expected[0], abs=1e-9)
        assert probability == pytest.approx(expected[1], abs=1e-12)
        assert [by_comparison[c] for c in model.comparisons] == pytest.approx(
            list(expected[2:]), abs=1e-9
        )
        linked += probability >= model.threshold
    assert 0 < linked < len(pairs)  # both sides of the threshold were compared


def test_replay_leaves_nothing_frozen_from_the_collector(model):
    """Replay keeps its long-lived objects out of full collections while it runs and hands
    them (and any cyclic garbage of its batches) back to the collector when it ends."""
    import gc

    from identity.resolver import replay

    gc.unfreeze()
    rows = [(raw["record_id"], normalise_record(raw)) for raw in identity_records(40, seed=3)]
    result = replay(rows, model, batch_size=25)
    assert gc.get_freeze_count() == 0
    assert result.records == len(rows)
    assert len(result.batch_seconds) == -(-len(rows) // 25)


def test_arrow_batches_for_the_store_have_the_types_pyarrow_infers():
    """The store's batches are built column by column: the table is the one pa.table makes."""
    import pyarrow as pa

    from identity.resolver import _table

    columns = {
        "record_id": ["a", "b", "c"],
        "first_ts": [T0, T0 + timedelta(seconds=1), None],
        "match_weight": [1.5, None, -2.0],
        "empty": [None, None, None],
        "given": pa.array([None, "x", None], pa.string()),
    }
    built = _table(columns)
    assert built.equals(pa.table(columns))
    assert built.schema == pa.table(columns).schema


def test_moved_records_read_through_id_records_before_and_after_folding(model, monkeypatch):
    """Merges append moves instead of updating the stored records; `id_records` shows each
    record's current person either way, and folding the moves into the base changes nothing
    a reader sees."""
    import identity.resolver as resolver_module

    monkeypatch.setattr(resolver_module, "FOLD_MOVES", 10**9)
    r = Resolver(model)
    rows = [normalise_record(raw) for raw in identity_records(150, seed=5)]
    for start in range(0, 300, 60):
        r.feed(*rows[start : start + 60])
    ((moves,),) = r.conn.execute("SELECT count(*) FROM id_record_moves").fetchall()
    assert moves > 0  # some persons merged and their records moved
    kept = r.identity.index.person_of
    assert r.identity.clusters() == kept
    stored = dict(r.conn.execute("SELECT record_id, person_id FROM id_records_base").fetchall())
    assert stored != kept  # the base still holds the persons the records were stored with
    r.identity.fold_moves()
    assert r.conn.execute("SELECT count(*) FROM id_record_moves").fetchall() == [(0,)]
    assert (
        dict(r.conn.execute("SELECT record_id, person_id FROM id_records_base").fetchall()) == kept
    )
    # A store that folds after every few moves decides exactly as one that never folds.
    never = Resolver(model)
    monkeypatch.setattr(resolver_module, "FOLD_MOVES", 3)
    folding = Resolver(model)
    for start in range(0, len(rows), 60):
        for resolver in (never, folding):
            resolver.feed(*rows[start : start + 60])
    ((left,),) = folding.conn.execute("SELECT count(*) FROM id_record_moves").fetchall()
    assert left < 3
    assert folding.identity.clusters() == never.identity.clusters()
    assert len(set(never.identity.clusters().values())) < len(rows)


def test_moves_are_numbered_after_the_stored_ones_across_rollback_erasure_and_restart():
    """The resolver keeps the last move's number between batches instead of reading it:
    a rolled-back batch's numbers are given again, an erasure that deleted the last moves
    and a restarted resolver number after what the store holds, as a read would."""
    r = Resolver()

    def numbers() -> list[int]:
        return [
            n for (n,) in r.conn.execute("SELECT seq FROM id_record_moves ORDER BY seq").fetchall()
        ]

    def two_persons(n: int) -> None:
        r.feed(rec(email=f"m{n}@example.org"), key=f"older-{n}")
        r.feed(rec(user_id=f"m-{n}"), rec(user_id=f"m-{n}", anonymous_id=f"a-{n}"))

    def merge(n: int) -> None:  # the younger person's two records move to the older
        r.feed(rec(user_id=f"m-{n}", email=f"m{n}@example.org"))

    for n in (1, 2):
        two_persons(n)
        merge(n)
    assert numbers() == [1, 2, 3, 4]
    two_persons(3)
    r.conn.execute("BEGIN")
    r.identity.resolve([("rolled", T0, rec(user_id="m-3", email="m3@example.org"))])
    r.conn.execute("ROLLBACK")
    r.identity.forget()  # as the pipeline does after a rollback
    assert numbers() == [1, 2, 3, 4]
    merge(3)
    assert numbers() == [1, 2, 3, 4, 5, 6]
    moved = [record_id_of(rec(user_id="m-3")), record_id_of(rec(user_id="m-3", anonymous_id="a-3"))]
    r.conn.execute("BEGIN")
    r.identity.erase_records(moved, "erasure-1", T0)
    r.conn.execute("COMMIT")
    assert numbers() == [1, 2, 3, 4]
    two_persons(4)
    merge(4)
    assert numbers() == [1, 2, 3, 4, 5, 6]
    r.identity = IdentityResolver(r.conn)  # a restart
    two_persons(5)
    merge(5)
    assert numbers() == list(range(1, 9))


def test_a_store_that_kept_id_records_as_a_table_opens_with_its_persons():
    """Stores written before moves were appended keep every record's person."""
    import duckdb

    from identity.resolver import _BASE_COLUMNS

    conn = duckdb.connect()
    r = Resolver()
    r.feed(rec(email="x@y.com"), key="older")
    r.feed(rec(user_id="u-1"), key="newer")
    r.feed(rec(user_id="u-1", email="x@y.com"))
    before = r.identity.clusters()
    rows = r.conn.execute("SELECT * FROM id_records").fetchall()
    conn.execute(f"CREATE TABLE id_records ({_BASE_COLUMNS}, PRIMARY KEY (record_id))")
    conn.executemany(f"INSERT INTO id_records VALUES ({', '.join('?' * len(rows[0]))})", rows)
    reopened = IdentityResolver(conn)
    assert reopened.clusters() == before
    assert set(before.values()) == {person_id_for("older")}
    kinds = dict(
        conn.execute(
            "SELECT table_name, table_type FROM information_schema.tables WHERE table_name LIKE 'id_records%'"
        ).fetchall()
    )
    assert kinds == {"id_records": "VIEW", "id_records_base": "BASE TABLE"}


def test_records_of_persons_from_the_index_equal_the_stores_after_merges_and_a_split(model):
    """The profile rebuild reads the affected persons' records from the index."""
    from identity.records import STRONG_FIELDS

    r = Resolver(model)
    assert r.identity.records_of_persons(["anyone"]) is None  # not loaded: read the store
    _merged_and_split(r)
    persons = [*sorted(set(r.identity.index.person_of.values()))[::3], "nobody"]
    held = r.identity.records_of_persons(persons)
    columns = ", ".join(STRONG_FIELDS)
    stored = r.conn.execute(
        f"SELECT person_id, record_id, {columns} FROM id_records "
        "WHERE person_id IN (SELECT unnest(?))",
        [persons],
    ).fetchall()
    assert len(stored) > len(persons) - 1  # some persons hold several records
    assert sorted(held) == sorted(stored)  # rows of (person_id, record_id, *STRONG_FIELDS)


def test_merged_in_persons_from_the_index_equal_the_stores_after_merges_and_a_split(model):
    """The profile rebuild reads who merged into a profile (the persons founded by one of
    its records, `id_persons.founder`) from the index: as batches create persons and a
    split revives one, and as loaded from the store, it says what the store says."""
    r = Resolver(model)
    assert r.identity.merged_into(["anyone"]) is None  # not loaded: read the store
    _merged_and_split(r)
    r.feed(rec(user_id="late-1"), rec(user_id="late-1", email="late@example.org"))
    persons = [*sorted(set(r.identity.index.person_of.values())), "nobody"]
    stored = dict(
        r.conn.execute(
            """SELECT r.person_id, list(DISTINCT p.person_id ORDER BY p.person_id)
               FROM id_persons p JOIN id_records r ON r.record_id = p.founder
               WHERE p.person_id <> r.person_id GROUP BY r.person_id"""
        ).fetchall()
    )
    assert stored  # some persons were merged into others
    assert r.identity.merged_into(persons) == stored
    r.identity.forget()
    r.identity.index  # noqa: B018 (loads it from the store)
    assert r.identity.merged_into(persons) == stored
    assert r.identity.merged_into(persons[::2]) == {
        p: m for p, m in stored.items() if p in persons[::2]
    }


def test_the_persons_holding_consent_subjects_are_those_of_the_stores_records(model):
    """A consent change re-scopes every person holding its identifiers: the profile
    builder finds them among the stored records, each with its current person (a merge
    or a split moved some)."""
    from consent.policy import load_policy
    from identity.normalise import Identifier
    from identity.records import STRONG_FIELDS
    from profiles.builder import ProfileBuilder

    r = Resolver(model)
    _merged_and_split(r)
    ((moves,),) = r.conn.execute("SELECT count(*) FROM id_record_moves").fetchall()
    assert moves > 0
    builder = ProfileBuilder(r.conn, load_policy())
    held = [
        Identifier(id_type, value)
        for row in r.conn.execute(f"SELECT {', '.join(STRONG_FIELDS)} FROM id_records").fetchall()[
            ::4
        ]
        for id_type, value in zip(STRONG_FIELDS, row, strict=True)
        if value is not None
    ]
    identifiers = {*held, Identifier("email", "nobody@example.org"), Identifier("name", "x")}
    expected = {
        person
        for (person,) in r.conn.execute(
            f"""SELECT DISTINCT person_id FROM id_records WHERE {
                " OR ".join(f"{t} IN (SELECT unnest(?))" for t in STRONG_FIELDS)
            }""",
            [[i.value for i in held if i.type == t] for t in STRONG_FIELDS],
        ).fetchall()
    }
    assert len(expected) > 10
    assert builder.persons_holding(identifiers) == expected
    assert builder.persons_holding({Identifier("email", "nobody@example.org")}) == set()
