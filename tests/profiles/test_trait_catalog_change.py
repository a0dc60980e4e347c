"""A computed trait added to the catalog after events were stored, against a rebuild.

Windowed traits that differ only in their window (page views in 7 and 30 days) add to
the same daily buckets; a new one of them (90 days, or 14 days) must hold the whole
history its twins hold, as a state rebuilt from every event with the new catalog does.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipelines.pipeline import Pipeline
from profiles import traits
from profiles.traits import at_read

END = datetime(2026, 11, 1, 12, tzinfo=UTC)
US = {"location": {"country": "US"}}
# One twin whose name sorts after the packaged ones, one before them, and a session twin.
TWINS = """
  page_views_90d: {op: count, kinds: [page, screen], window_days: 90}
  page_views_14d: {op: count, kinds: [page, screen], window_days: 14}
  sessions_1d: {op: distinct_count, kinds: [page, screen, track], field: session, window_days: 1}
"""


def _catalog_with_twins(path: Path) -> Path:
    text = traits.TRAITS_PATH.read_text()
    assert "\ncomputed:\n" in text
    path.write_text(text.replace("\ncomputed:\n", "\ncomputed:\n" + TWINS.lstrip("\n"), 1))
    return path


def _batches(make_event) -> list[list[dict]]:
    """Pages and screens of four devices over 100 days, in batches of 20, oldest first."""
    events = [
        make_event(
            "page" if n % 3 else "screen",
            anonymousId=f"dev-{n % 4}",
            timestamp=(END - timedelta(days=(n * 7) % 100, hours=n % 7)).isoformat(),
            context=US,
        )
        for n in range(120)
    ]
    events.sort(key=lambda e: e["timestamp"])
    return [events[start : start + 20] for start in range(0, len(events), 20)]


def _views(pipeline: Pipeline) -> dict[str, dict]:
    persons = {p for (p,) in pipeline.conn.execute("SELECT person_id FROM facts").fetchall()}
    built = pipeline.builder.build(persons)
    return {
        person: {
            scope: {
                "computed": view["computed"],
                "windows": view["windows"],
                "at_end": at_read(pipeline.builder.traits, view["computed"], view["windows"], END),
            }
            for scope, view in doc["views"].items()
        }
        for person, doc in built.items()
    }


@pytest.mark.parametrize("stored_batches", [1, 5])
def test_a_twin_added_later_holds_the_whole_history(
    run, make_event, tmp_path, monkeypatch, stored_batches
):
    batches = _batches(make_event)
    for batch in batches[:stored_batches]:  # stored under the packaged catalog
        run.feed(*batch)
    run.pipeline.close()

    monkeypatch.setattr(traits, "TRAITS_PATH", _catalog_with_twins(tmp_path / "traits.yaml"))
    run.pipeline = Pipeline(tmp_path / "state.duckdb")  # restarted with the twins
    for batch in batches[stored_batches:]:
        run.feed(*batch)
    restarted = _views(run.pipeline)

    with type(run).of_batches(tmp_path / "rebuilt.duckdb", batches) as rebuilt_pipeline:
        rebuilt = _views(rebuilt_pipeline)  # every event under the new catalog

    assert set(restarted) == set(rebuilt) and len(rebuilt) == 4
    total = {
        name: sum(views["subject_access"]["at_end"][name] for views in rebuilt.values())
        for name in ("page_views_90d", "page_views_30d", "page_views_14d", "sessions_1d")
    }
    assert total["page_views_90d"] > total["page_views_30d"] > total["page_views_14d"] > 0
    assert total["sessions_1d"] > 0
    for person, views in rebuilt.items():
        assert restarted[person] == views, person


def test_a_count_of_every_event_added_later_counts_only_what_came_after(
    run, make_event, tmp_path, monkeypatch
):
    """A count of every event kind holds `_seen`'s rows and is read through them, unless
    it joined the catalog after events were stored: then it keeps its own, shorter count."""
    batches = _batches(make_event)
    for batch in batches[:2]:  # stored under the packaged catalog
        run.feed(*batch)
    run.pipeline.close()
    path = tmp_path / "traits.yaml"
    text = traits.TRAITS_PATH.read_text()
    path.write_text(
        text.replace("\ncomputed:\n", "\ncomputed:\n  all_events: {op: count, kinds: ['*']}\n", 1)
    )
    monkeypatch.setattr(traits, "TRAITS_PATH", path)
    run.pipeline = Pipeline(tmp_path / "state.duckdb")  # restarted with the new count
    for batch in batches[2:]:
        run.feed(*batch)
    views = _views(run.pipeline)
    counted = {
        name: sum(v["subject_access"]["computed"][name] for v in views.values())
        for name in ("event_count", "all_events")
    }
    assert counted == {"event_count": 120, "all_events": 80}


def test_rows_of_a_trait_gone_from_the_catalog_change_no_profile(
    run, make_event, tmp_path, monkeypatch
):
    """Accumulator rows of a trait the catalog no longer has stay stored (the roll-up reads
    traits by their number in the catalog, none for such rows): the profiles built are
    those of a state that never had the trait."""
    batches = _batches(make_event)
    path = tmp_path / "traits.yaml"
    text = traits.TRAITS_PATH.read_text()
    path.write_text(
        text.replace(
            "\ncomputed:\n",
            "\ncomputed:\n  screen_count: {op: count, kinds: [screen]}\n",
            1,
        )
    )
    with monkeypatch.context() as patched:
        patched.setattr(traits, "TRAITS_PATH", path)
        run.pipeline.close()
        run.pipeline = Pipeline(tmp_path / "state.duckdb")  # stored with the extra trait
        for batch in batches[:3]:
            run.feed(*batch)
        run.pipeline.close()
    run.pipeline = Pipeline(tmp_path / "state.duckdb")  # the packaged catalog again
    for batch in batches[3:]:
        run.feed(*batch)
    ((gone,),) = run.pipeline.conn.execute(
        "SELECT count(*) FROM trait_rows WHERE trait = 'screen_count'"
    ).fetchall()
    assert gone > 0
    restarted = _views(run.pipeline)

    with type(run).of_batches(tmp_path / "never.duckdb", batches) as never_pipeline:
        never = _views(never_pipeline)  # every event under the packaged catalog
    assert len(never) == 4 and restarted == never
