"""The profile benchmark's loader: real document shapes, each profile its own ids, stored whole."""

from __future__ import annotations

import orjson

from pipelines import topics
from pipelines.bench_profiles import documents, templates
from profiles.store import ConsumedRecord, ProfileStore


def test_generated_profiles_keep_the_real_shapes_with_their_own_ids(tmp_path):
    docs = templates(persons=12, events=240, seed=5)
    keys, values = documents(docs, 0, 3 * len(docs))
    assert len(set(keys)) == len(keys) == 3 * len(docs)
    store = ProfileStore(tmp_path / "profiles.duckdb")
    store.apply(
        [
            ConsumedRecord(topics.PROFILES_CHANGELOG, 0, n, key, value)
            for n, (key, value) in enumerate(zip(keys, values, strict=True))
        ]
    )
    identifiers = 0
    for n, key in enumerate(keys):
        made, template = orjson.loads(values[n]), docs[n % len(docs)]
        assert made["person_id"] == key.decode() == store.get(key.decode())["person_id"]
        assert made["views"].keys() == template["views"].keys()
        assert (
            made["views"][next(iter(made["views"]))]["computed"]
            == (template["views"][next(iter(template["views"]))]["computed"])
        )
        identifiers += sum(len(v) for v in made["identifiers"].values())
    (indexed,) = store.conn.execute("SELECT count(*) FROM profile_identifiers").fetchone()
    assert indexed == identifiers  # no two generated profiles share an identifier
    store.close()
