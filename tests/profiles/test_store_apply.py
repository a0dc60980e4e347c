"""ProfileStore.apply writes only the identifiers that changed: the table, the in-memory
index and replays end as if every changed person's identifiers were written again."""

from __future__ import annotations

import zlib

import orjson

from consent.ledger import GENESIS_HASH, LedgerEntry, canonical_json, entry_hash, verify_chain
from pipelines import topics
from profiles.store import ConsumedRecord, ProfileStore, _head


class Changelog:
    """Changelog records at growing offsets, as a replica consumes them."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self, person: str, identifiers: dict[str, list[str]] | None) -> ConsumedRecord:
        self.offset += 1
        doc = None
        if identifiers is not None:
            doc = orjson.dumps(
                {"person_id": person, "version": self.offset, "identifiers": identifiers}
            )
        return ConsumedRecord(topics.PROFILES_CHANGELOG, 0, self.offset, person.encode(), doc)


def _table(store: ProfileStore) -> dict[tuple[str, str], str]:
    rows = store.reader().execute("SELECT id_type, id_value, person_id FROM profile_identifiers")
    return {(t, v): p for t, v, p in rows.fetchall()}


def _index_agrees(store: ProfileStore) -> dict[tuple[str, str], str]:
    table = _table(store)
    everything = table | {("email", e): "" for e in ("a1", "a2", "a3", "b1", "gone")}
    for id_type, value in everything:
        assert store.identifiers.person(id_type, value) == table.get((id_type, value)), value
    return table


def test_only_changed_identifiers_are_written_and_the_index_follows(tmp_path):
    store = ProfileStore(tmp_path / "replica.duckdb")
    change = Changelog()
    try:
        store.apply([change("p_a", {"email": ["a1", "a2"]}), change("p_b", {"email": ["b1"]})])
        store.warm(freeze=False)  # the index loaded: from now on it follows each write
        assert _index_agrees(store) == {
            ("email", "a1"): "p_a",
            ("email", "a2"): "p_a",
            ("email", "b1"): "p_b",
        }

        # A loses a2 and gains a3; B's change keeps its identifiers as they were.
        store.apply([change("p_a", {"email": ["a1", "a3"]}), change("p_b", {"email": ["b1"]})])
        assert _index_agrees(store) == {
            ("email", "a1"): "p_a",
            ("email", "a3"): "p_a",
            ("email", "b1"): "p_b",
        }

        # B's document takes a1 while A's is unchanged: the latest write holds it.
        store.apply([change("p_b", {"email": ["b1", "a1"]})])
        assert _index_agrees(store)[("email", "a1")] == "p_b"

        # Both documents list a1 in one apply: the later document holds it, as it would
        # from two applies (whichever person id sorts first).
        store.apply([change("p_b", {"email": ["b1", "a1"]}), change("p_a", {"email": ["a1"]})])
        table = _index_agrees(store)
        assert table == {("email", "a1"): "p_a", ("email", "b1"): "p_b"}
        store.apply([change("p_a", {"email": ["a1"]}), change("p_b", {"email": ["b1", "a1"]})])
        assert _index_agrees(store)[("email", "a1")] == "p_b"
        # A person's earlier document in the same apply does not count: only the latest.
        store.apply(
            [
                change("p_a", {"email": ["a1"]}),
                change("p_b", {"email": ["b1", "a1"]}),
                change("p_a", {"email": ["a1"]}),
            ]
        )
        assert _index_agrees(store)[("email", "a1")] == "p_a"

        # A tombstone drops what the person held; a replay of it changes nothing.
        tombstone = change("p_b", None)
        store.apply([tombstone])
        store.apply([tombstone])
        assert _index_agrees(store) == {("email", "a1"): "p_a"}
        assert store.get("p_b") is None
    finally:
        store.close()


def test_a_lineage_entry_delivered_twice_in_one_apply_is_stored_once(tmp_path):
    store = ProfileStore(tmp_path / "replica.duckdb")
    entries, prev = [], GENESIS_HASH
    for seq, decision in ((1, "allowed"), (2, "withheld")):
        entry = {"event_key": f"e{seq}", "decision": decision, "purpose": "ads", "kind": "x"}
        digest = entry_hash(prev, entry)
        entries.append(LedgerEntry(seq, entry, prev, digest))
        prev = digest
    values = [orjson.dumps(e.as_record(), option=orjson.OPT_SORT_KEYS) for e in entries]
    records = [
        ConsumedRecord(topics.LINEAGE, 0, offset, b"k", value)
        for offset, value in enumerate([values[0], values[1], values[1]])
    ]
    try:
        store.apply(records)
        store.apply(records)  # re-delivered: the same rows
        rows = store.reader().execute("SELECT seq, entry FROM lineage ORDER BY seq").fetchall()
        assert [(seq, text) for seq, text in rows] == [
            (e.seq, canonical_json(e.entry).decode()) for e in entries
        ]
        assert verify_chain(store.conn).ok
        outcomes = store.stats()
        assert (outcomes["applied"], outcomes["withheld"]) == (1, 1)
    finally:
        store.close()


def test_documents_stored_zlib_compressed_by_an_older_replica_still_read(tmp_path):
    changelog = Changelog()
    store = ProfileStore(tmp_path / "replica.duckdb")
    try:
        store.apply([changelog("p1", {"email": ["a1"]}), changelog("p2", {"email": ["b1"]})])
        new = store.document("p1")
        assert new == {"person_id": "p1", "version": 1, "identifiers": {"email": ["a1"]}}
        ((blob,),) = (
            store.reader()
            .execute("SELECT doc FROM profile_documents WHERE person_id = 'p2'")
            .fetchall()
        )
        assert not blob.startswith(b"x")  # packed anew, not zlib's stream
        old = {"person_id": "p2", "version": 2, "identifiers": {"email": ["b1"]}}
        store.conn.execute(
            "UPDATE profile_documents SET doc = ? WHERE person_id = 'p2'",
            [zlib.compress(orjson.dumps(old), 1)],
        )
        store.cache.invalidate(["p2"])
        assert store.document("p2") == old
    finally:
        store.close()


def _contents(store: ProfileStore) -> dict[str, list[tuple]]:
    tables = [t for (t,) in store.reader().execute("SHOW TABLES").fetchall()]
    return {
        t: sorted(store.reader().execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables
    }


def test_records_re_delivered_after_a_restart_store_what_one_delivery_stores(
    tmp_path, run, make_event
):
    """Ledger entries, outcomes, dead letters, identity events and quality reports are
    inserted, not upserted; an apply whose records are partly stored already (a worker
    published a batch again after a crash) is applied again as upserts."""
    us = {"location": {"country": "US"}}
    run.feed(
        make_event("page", anonymousId="dev-1", context=us),
        make_event("identify", userId="u-1", traits={"email": "a@example.org"}, context=us),
        b"not json",
    )
    run.feed(
        make_event("identify", userId="u-1", anonymousId="dev-1", context=us),
        make_event("page", userId="u-2", context=us),
        b"{broken",
    )
    records = [
        ConsumedRecord(o.topic, 0, n, o.key, o.value, o.headers) for n, o in enumerate(run.outputs)
    ]
    kinds = {r.topic for r in records}
    assert {topics.LINEAGE, topics.REJECTED, topics.IDENTITY_LINKS} <= kinds
    assert topics.QUALITY_REPORTS in kinds
    once, again = ProfileStore(tmp_path / "once.duckdb"), ProfileStore(tmp_path / "again.duckdb")
    try:
        half = len(records) // 2
        once.apply(records[:half])
        once.apply(records[half:])
        again.apply(records[:half])
        again.apply(records[half // 2 :])  # the second half of the first apply again
        again.apply(records)  # everything again
        assert _contents(again) == _contents(once)
        assert verify_chain(again.conn).ok
        stats = again.stats()
        assert stats == once.stats()
        assert stats["rejected"] == 2 and stats["received"] == 6
    finally:
        once.close()
        again.close()


def test_merges_in_one_apply_move_records_as_applied_one_by_one(tmp_path):
    """A merge moves the records stored and those assigned earlier in the same apply;
    records assigned after it stay; merges compose (B into A, then A into C)."""
    offsets = iter(range(100))

    def link(kind: str, person: str, other: str | None = None, **detail) -> ConsumedRecord:
        n = next(offsets)
        value = {"link_id": f"l{n}", "kind": kind, "person_id": person, "ts": f"{n:04d}"}
        value |= {"other_person_id": other, "detail": detail}
        return ConsumedRecord(topics.IDENTITY_LINKS, 0, n, None, orjson.dumps(value))

    store = ProfileStore(tmp_path / "replica.duckdb")
    try:
        store.apply(
            [
                link("person_created", p, record_id=r)
                for r, p in (("r1", "A"), ("r2", "B"), ("r3", "C"))
            ]
        )
        store.apply(
            [
                link("record_linked", "B", record_l="r4", record_r="r5"),
                link("merge", "A", "B"),
                link("person_created", "B", record_id="r6"),
                link("merge", "C", "A"),
                link("split", "C", "D", records=["r5"]),
            ]
        )
        owners = store.record_owners({f"r{n}" for n in range(1, 7)})
        assert owners == {"r1": "C", "r2": "C", "r3": "C", "r4": "C", "r5": "D", "r6": "B"}
    finally:
        store.close()


def test_a_lineage_entry_published_again_with_other_content_replaces_the_first(tmp_path):
    """A worker that crashed before committing a batch chains it again: its second
    entries (same sequence numbers) are the ones kept, their outcomes too."""
    store = ProfileStore(tmp_path / "replica.duckdb")

    def published(offset: int, decision: str) -> ConsumedRecord:
        entry = {"event_key": "e1", "decision": decision, "purpose": "ads", "kind": "x"}
        chained = LedgerEntry(1, entry, GENESIS_HASH, entry_hash(GENESIS_HASH, entry))
        value = orjson.dumps(chained.as_record(), option=orjson.OPT_SORT_KEYS)
        return ConsumedRecord(topics.LINEAGE, 0, offset, b"e1", value)

    try:
        store.apply([published(0, "allowed")])
        store.apply([published(1, "withheld")])
        ((text,),) = store.reader().execute("SELECT entry FROM lineage").fetchall()
        assert orjson.loads(text)["decision"] == "withheld"
        assert verify_chain(store.conn).ok
        assert (store.stats()["applied"], store.stats()["withheld"]) == (0, 1)
    finally:
        store.close()


def test_a_documents_version_and_identifiers_whatever_its_shape():
    """`_head` reads the members before "views" when they hold both; a document of another
    shape (keys unsorted, no version, a head that does not parse alone) is read whole, to
    the same answer a full parse gives."""
    ids = {"email": ["a@example.org"], "user_id": ["u-1", "u-2"]}
    views = {"marketing": {"traits": {"note": ',"views": {'}}}
    shapes = [
        orjson.dumps(
            {"identifiers": ids, "person_id": "p1", "version": 7, "views": views},
            option=orjson.OPT_SORT_KEYS,
        ),
        orjson.dumps({"views": views, "version": 7, "identifiers": ids, "person_id": "p1"}),
        orjson.dumps({"identifiers": ids, "views": views, "version": 7}),
        b'{"identifiers": {"email": ["a@example.org"], "user_id": ["u-1", "u-2"]}, '
        b'"version": 7 ,"views":' + orjson.dumps(views) + b"}",
    ]
    for document in shapes:
        assert _head(document) == (7, ids), document
    assert _head(orjson.dumps({"identifiers": ids, "views": {}})) == (0, ids)
    assert _head(orjson.dumps({"person_id": "p1", "views": {}})) == (0, {})
