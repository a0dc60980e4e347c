"""The profile rebuild's SQL roll-up against each computed trait's row-by-row definition.

The builder sums a view's accumulator rows in DuckDB and rolls up each set of views that
allow the same groups once. Here every view of every person is recomputed in Python from
the stored (trait, bucket) rows its allowed groups add up, and the two must agree exactly.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pytest

from pipelines.pipeline import Pipeline, SourceRecord
from pipelines.topics import route
from profiles.builder import _iso_utc
from profiles.traits import SEEN, TraitCatalog
from synthetic.events import generate

END = datetime(2026, 11, 1, tzinfo=UTC)
CENT = Decimal("0.01")


def _shifted(raw: bytes, days: int) -> bytes:
    """The event `days` earlier (lines that are not JSON objects with a time stay as they are)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    if not isinstance(doc, dict) or not isinstance(doc.get("timestamp"), str):
        return raw
    try:
        ts = datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00"))
    except ValueError:
        return raw
    doc["timestamp"] = (ts - timedelta(days=days)).isoformat()
    return orjson.dumps(doc)


@pytest.fixture(scope="module")
def rebuilt():
    """A synthetic stream whose first third happened a month earlier, in batches; then
    every person rebuilt. Out: (pipeline, profiles, stored rows per view, the build's
    `AllowedGroups`)."""
    lines = [raw for raw, _ in generate(persons=40, events=1500, seed=11, end=END)]
    lines = [_shifted(raw, 30) if n < 500 else raw for n, raw in enumerate(lines)]
    pipeline = Pipeline(":memory:", quality=False)
    records = [SourceRecord(route(raw)[0], 0, n, raw) for n, raw in enumerate(lines)]
    for start in range(0, len(records), 300):
        pipeline.process(records[start : start + 300], lambda _outputs: None)
    persons = {p for (p,) in pipeline.conn.execute("SELECT person_id FROM facts").fetchall()}
    profiles = pipeline.builder.build(persons)
    # Each view's allowed (record, purpose, jurisdiction) groups, as the build works them out.
    affected = sorted(persons)
    pipeline.conn.register("_affected", pa.table({"person_id": affected}))
    allowed = pipeline.builder._allowed_groups(affected)
    groups = [(view, group) for view in allowed.views for group in allowed.groups(view)]
    pipeline.conn.register(
        "_ag",
        pa.table(
            {
                "person_id": [person for (person, _), _ in groups],
                "scope": [scope for (_, scope), _ in groups],
                "record_id": [group[0] for _, group in groups],
                "purpose": [group[1] for _, group in groups],
                "jurisdiction": [group[2] for _, group in groups],
            }
        ),
    )
    rows: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    for person, scope, *row in pipeline.conn.execute(
        """SELECT a.person_id, a.scope, s.trait, s.bucket, sum(s.n)::BIGINT, sum(s.amount),
                  min(s.first_ts), max(s.last_ts), arg_max(s.value, (s.last_ts, s.last_key))
           FROM trait_rows s JOIN _ag a USING (record_id, purpose, jurisdiction)
           GROUP BY ALL ORDER BY ALL"""
    ).fetchall():
        rows[(person, scope)].append(tuple(row))
    yield pipeline, profiles, rows, allowed
    pipeline.close()


def _by_definition(
    catalog: TraitCatalog, rows: list[tuple], read_through: dict[str, str]
) -> tuple[dict, dict]:
    """(computed, windows) of one view from its (trait, bucket, n, amount, first, last, value)
    rows, one trait at a time as traits.yaml defines them; a trait that adds another's rows
    (`read_through`) from that one's."""
    mine: dict[str, list[tuple]] = defaultdict(list)
    for row in rows:
        mine[row[0]].append(row)
    last_seen = max(r[5] for r in mine[SEEN])
    horizon = (last_seen.astimezone(UTC).date() - timedelta(days=catalog.max_window)).isoformat()
    computed: dict[str, Any] = {}
    windows: dict[str, Any] = {}
    for spec in catalog.computed:
        trait = mine[read_through.get(spec.name, spec.name)]
        if spec.op == "days_since":
            continue
        if spec.window_days:
            per_day: dict[str, int] = defaultdict(int)
            for _, bucket, n, *_ in trait:
                if bucket[:10] > horizon:
                    per_day[bucket[:10]] += n if spec.op == "count" else 1
            windows[spec.name] = {day: per_day[day] for day in sorted(per_day)}
        elif spec.op == "count":
            computed[spec.name] = sum(r[2] for r in trait)
        elif spec.op == "distinct_count":
            computed[spec.name] = len({r[1] for r in trait})
        elif spec.op in ("sum", "mean"):
            added: dict[str, list[Decimal]] = defaultdict(list)
            taken: dict[str, Decimal] = defaultdict(Decimal)
            for _, bucket, n, amount, *_ in trait:
                sign, group = bucket.split("|")[:2]
                if sign == "+":
                    added[group].append(amount / n if spec.distinct_by else amount)
                else:
                    taken[group] += amount
            if spec.op == "mean":
                computed[spec.name] = {
                    g: float((sum(v, Decimal(0)) / len(v)).quantize(CENT))
                    for g, v in sorted(added.items())
                }
            else:
                groups = sorted(set(added) | set(taken))
                computed[spec.name] = {
                    g: float((sum(added[g], Decimal(0)) - taken[g]).quantize(CENT)) for g in groups
                }
        elif spec.op in ("first_time", "last_time"):
            times = [r[4] if spec.op == "first_time" else r[5] for r in trait]
            pick = min if spec.op == "first_time" else max
            computed[spec.name] = pick(times).isoformat() if times else None
        elif spec.op == "latest":
            computed[spec.name] = orjson.loads(trait[0][6]) if trait and trait[0][6] else None
        elif spec.op == "top":
            ranked = sorted(trait, key=lambda r: (-r[2], r[1]))
            computed[spec.name] = [r[1] for r in ranked[: spec.k]]
        elif spec.op == "open_count":
            opened = {r[1].removeprefix("open|") for r in trait if r[1].startswith("open|")}
            closed = {r[1].removeprefix("close|") for r in trait if r[1].startswith("close|")}
            computed[spec.name] = len(opened - closed)
    return computed, windows


def test_every_view_equals_the_definition_of_its_traits(rebuilt):
    pipeline, profiles, rows, _ = rebuilt
    catalog = pipeline.builder.traits
    through = pipeline.builder.read_through
    # Read through `_seen`, another's rows or a window twin's, and never written.
    assert through == {
        "event_count": SEEN,
        "first_seen": SEEN,
        "last_seen": SEEN,
        "last_order_at": "first_order_at",
        "average_order_value": "lifetime_value",
        "page_views_7d": "page_views_30d",
        "sessions_7d": "sessions_30d",
    }
    assert not {r[0] for view_rows in rows.values() for r in view_rows} & set(through)
    assert rows
    for (person, scope), view_rows in rows.items():
        view = profiles[person]["views"][scope]
        computed, windows = _by_definition(catalog, view_rows, through)
        assert view["computed"] == computed, (person, scope)
        assert view["windows"] == windows, (person, scope)
    # Each view listed is one the profile holds, in scope order.
    for person, doc in profiles.items():
        held = [scope for (p, scope) in rows if p == person]
        assert list(doc["views"]) == sorted(held)


def test_the_stream_reaches_every_op_the_horizon_and_views_that_differ(rebuilt):
    """Guards the comparison above: it saw every kind of trait, windows that dropped old
    days, and persons whose views allow different groups (so roll-ups are not all shared)."""
    _, profiles, rows, allowed = rebuilt
    views = [v for doc in profiles.values() for v in doc["views"].values()]
    for name in ("top_categories", "open_tickets", "last_csat", "average_order_value"):
        assert any(v["computed"][name] for v in views), name
    assert any(v["computed"]["lifetime_value"] for v in views)
    old = [
        (person, scope)
        for (person, scope), view_rows in rows.items()
        if any(r[0] == "page_views_30d" for r in view_rows)
        and len(profiles[person]["views"][scope]["windows"]["page_views_30d"])
        < len({r[1] for r in view_rows if r[0] == "page_views_30d"})
    ]
    assert old, "no view had days before its horizon"
    differing = [
        doc["person_id"]
        for doc in profiles.values()
        if len({orjson.dumps(v["computed"]) for v in doc["views"].values()}) > 1
    ]
    assert differing, "every person's views rolled up the same rows"
    shared = allowed.shared
    assert len({(person, of) for (person, _), of in shared.items()}) < len(shared)


@pytest.mark.parametrize(
    "stamp",
    [
        datetime(2026, 10, 2, 3, 4, 5, tzinfo=UTC),
        datetime(2026, 10, 2, 3, 4, 5, 120, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=5))),
    ],
)
def test_times_formatted_in_sql_as_python_does(stamp: datetime) -> None:
    """The roll-up's and identify traits' times, formatted by DuckDB (`_iso_utc`), read as
    Python's `isoformat` of the naive UTC time with "+00:00", whatever the session's zone."""
    conn = duckdb.connect()
    conn.execute("SET TimeZone = 'Europe/Berlin'")
    sql = f"SELECT {_iso_utc('x')} FROM (SELECT ?::TIMESTAMPTZ AS x)"
    (got,) = conn.execute(sql, [stamp]).fetchone()
    assert got == stamp.astimezone(UTC).replace(tzinfo=None).isoformat() + "+00:00"
