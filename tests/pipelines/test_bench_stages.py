"""The stage hot-spot benchmark: every stage's own CPU is counted once, outcomes unchanged."""

from __future__ import annotations

import gc

import orjson

from pipelines.bench import END
from pipelines.bench_stages import (
    CHECKPOINT_LABEL,
    HEADING,
    SPANS,
    TIMERS_LABEL,
    SpanClock,
    compare_outputs,
    replace_section,
    report,
    run_stages,
    source_digest,
)
from pipelines.pipeline import OutRecord, Pipeline, SourceRecord
from pipelines.produce import read_lines
from pipelines.topics import route
from synthetic.events import write_dataset


def test_stage_spans_add_up_and_leave_outcomes_as_a_plain_run(tmp_path):
    events = tmp_path / "events.jsonl"
    write_dataset(events, None, persons=8, events=240, seed=7, end=END)
    measured = run_stages(events, 100, tmp_path / "state.duckdb", tmp_path / "profile.txt")

    plain = Pipeline(tmp_path / "plain.duckdb")
    lines = list(read_lines(events))
    records = [SourceRecord(route(raw)[0], 0, i, raw) for i, raw in enumerate(lines)]
    for start in range(0, len(records), 100):
        plain.process(records[start : start + 100], lambda _outputs: None)
    expected = dict(
        plain.conn.execute("SELECT outcome, count(*) FROM outcomes GROUP BY 1").fetchall()
    )
    plain.close()

    assert measured["events"] == 240
    # The generator repeats a few events on purpose: a duplicate has no outcome of its own.
    assert measured["outcomes"] == expected and 230 < sum(expected.values()) <= 240
    labels = {label for label, _, _ in SPANS} | {CHECKPOINT_LABEL, TIMERS_LABEL}
    assert set(measured["spans"]) <= labels
    # The timers' own cost is a line of its own, out of the lines that call timed spans.
    assert measured["spans"][TIMERS_LABEL] > 0
    assert {"contract checks", "consent gate", "profile rebuild"} <= set(measured["spans"])
    # The commit and the batches' share of checkpoints are counted, not left in "other".
    assert {"state commit", CHECKPOINT_LABEL} <= set(measured["spans"])
    # Exclusive times: together never more than the process's CPU over the run.
    assert 0 < sum(measured["spans"].values()) <= measured["cpu_s"] * 1.01
    assert "Pipeline.process" in (tmp_path / "profile.txt").read_text()


def test_a_warm_run_starts_from_the_cached_fill_and_counts_only_its_own_events(tmp_path):
    events, warm_events = tmp_path / "events.jsonl", tmp_path / "warm.jsonl"
    write_dataset(events, None, persons=4, events=60, seed=7, end=END)
    write_dataset(warm_events, None, persons=20, events=40, seed=8, end=END)
    cached = tmp_path / "warm.duckdb"
    cold = run_stages(events, 30, tmp_path / "cold.duckdb", None, tmp_path / "cold.jsonl")
    warm = run_stages(
        events, 30, tmp_path / "a.duckdb", None, tmp_path / "a.jsonl", (warm_events, cached)
    )
    assert cached.exists() and not cached.with_name("warm.duckdb.partial").exists()
    filled_at = cached.stat().st_mtime_ns
    again = run_stages(
        events, 30, tmp_path / "b.duckdb", None, tmp_path / "b.jsonl", (warm_events, cached)
    )
    assert cached.stat().st_mtime_ns == filled_at  # the second run copied, not refilled
    assert warm["warm_events"] == again["warm_events"] == 40 and cold["warm_events"] == 0
    # The timed events' outcomes alone, whatever the store held before them.
    assert warm["outcomes"] == again["outcomes"] == cold["outcomes"]
    assert warm["tables"] == again["tables"] and warm["tables"] != cold["tables"]
    assert compare_outputs(again, warm).startswith("- all ")


def test_the_source_digest_follows_the_stage_code_and_not_the_benchmarks(tmp_path):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "pipeline.py").write_text("x = 1\n")
    first = source_digest(tmp_path)
    (tmp_path / "pipelines" / "bench_stages.py").write_text("y = 2\n")
    assert source_digest(tmp_path) == first
    (tmp_path / "pipelines" / "pipeline.py").write_text("x = 2\n")
    assert source_digest(tmp_path) != first


def test_report_replaces_only_its_own_section(tmp_path):
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\npreamble\n\n## Other\n\nkept\n\n" + HEADING + "\n\nold\n")
    figures = {"events": 20_000, "cpu_s": 10.0, "spans": {"consent gate": 2.0}, "outcomes": {}}
    before = {**figures, "cpu_s": 20.0, "spans": {"consent gate": 8.0}}
    section = report(figures, before, "python -m pipelines.bench_stages", 10_000)
    replace_section(bench, section)
    text = bench.read_text()
    assert "## Other\n\nkept" in text and "preamble" in text and "\nold\n" not in text
    assert text.count(HEADING) == 1
    assert "| CPU s per 10k events, all stages | 10.000 | 5.000 | 0.50 |" in text
    assert "| consent gate | 4.000 | 40% | 1.000 | 20% |" in text


def test_a_batch_runs_without_cyclic_collection_and_restores_it(tmp_path, make_event):
    pipeline = Pipeline(tmp_path / "state.duckdb", quality=False)
    seen: list[bool] = []

    def emit(_outputs: list[OutRecord]) -> None:
        seen.append(gc.isenabled())

    raw = orjson.dumps(make_event("page"))
    assert gc.isenabled()
    pipeline.process([SourceRecord("tessera.events.behavioral", 0, 0, raw)], emit)
    assert seen == [False] and gc.isenabled()
    pipeline.close()


def test_a_run_collects_as_the_worker_does_and_puts_the_collector_back(tmp_path, monkeypatch):
    import pipelines.bench_stages as bench_stages
    from pipelines.faust_engine import YOUNG_COLLECTION_EVERY

    events = tmp_path / "events.jsonl"
    write_dataset(events, None, persons=4, events=60, seed=7, end=END)
    before = gc.get_threshold()
    seen: list[tuple[tuple[int, int, int], int]] = []
    feed = bench_stages._feed_records

    def watched(*args, **kwargs):
        seen.append((gc.get_threshold(), gc.get_freeze_count()))
        return feed(*args, **kwargs)

    monkeypatch.setattr(bench_stages, "_feed_records", watched)
    run_stages(events, 30, tmp_path / "state.duckdb", None)
    ((threshold, frozen),) = seen
    # While timed: the worker's young threshold, and the set-up pipeline frozen.
    assert threshold[0] == YOUNG_COLLECTION_EVERY != before[0] and frozen > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_outputs_compare_equal_runs_and_name_the_first_difference(tmp_path):
    events = tmp_path / "events.jsonl"
    write_dataset(events, None, persons=6, events=120, seed=7, end=END)
    runs = []
    for name in ("before", "after"):
        outputs = tmp_path / f"outputs-{name}.jsonl"
        runs.append(run_stages(events, 40, tmp_path / f"{name}.duckdb", None, outputs))
    before, after = runs
    lines = (tmp_path / "outputs-after.jsonl").read_bytes().splitlines()
    # Two runs read the wall clock at different times: those fields are left out.
    assert all(b"rejected_at" not in line and b"gx_seconds" not in line for line in lines)
    assert compare_outputs(after, before).startswith(f"- all {len(lines):,} output records equal")
    assert compare_outputs(after, before).endswith(f"all {len(after['tables'])} state tables equal")
    assert {"lineage", "consent_state", "outcomes"} <= set(after["tables"])

    changed = orjson.loads(lines[3])
    changed["value"] = (changed["value"] or "") + " "
    lines[3] = orjson.dumps(changed)
    (tmp_path / "outputs-after.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    tables = dict(after["tables"])
    tables["lineage"] = "0:changed"
    line = compare_outputs({**after, "tables": tables}, before)
    assert f"output records DIFFER: 1 of {len(lines):,}" in line and "first at #3" in line
    assert line.endswith("state tables differing: lineage")


def test_a_batch_leaves_no_cycle_holding_its_events(tmp_path, make_event):
    # Quality suites on: their parser leaves reference cycles behind on every batch.
    pipeline = Pipeline(tmp_path / "state.duckdb")
    raws = [orjson.dumps(make_event("page")) for _ in range(40)]
    batches = [
        [SourceRecord("tessera.events.behavioral", 0, i, raw) for i, raw in enumerate(raws)][s::2]
        for s in (0, 1)
    ]
    pipeline.process(batches[0], lambda _outputs: None)
    gc.collect()
    gc.disable()
    try:
        pipeline.process(batches[1], lambda _outputs: None)
        # Freed as the batch ended (reference counting), not left for the collector.
        left = [o for o in gc.get_objects() if type(o).__name__ in ("_Item", "LedgerEntry")]
    finally:
        gc.enable()
    pipeline.close()
    assert left == []


def test_the_timers_own_cost_is_taken_out_of_the_spans_and_counted_once_per_call():
    clock = SpanClock()
    clock.calibrate(calls=2_000, rounds=2)
    assert clock._inner > 0 and clock._outer > 0 and not clock.seconds  # starts from zero
    inner = clock.wrap("inner", lambda: None)
    outer = clock.wrap("outer", lambda: [inner() for _ in range(50)])
    outer()
    assert clock.calls == {"inner": 50, "outer": 1}
    per_call = clock._inner + clock._outer
    assert abs(clock.seconds[TIMERS_LABEL] - 51 * per_call) < 1e-9
