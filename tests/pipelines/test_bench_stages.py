"""The stage hot-spot benchmark: every stage's own CPU is counted once, outcomes unchanged."""

from __future__ import annotations

import gc

import orjson

from pipelines.bench import END
from pipelines.bench_stages import (
    HEADING,
    SPANS,
    first_difference,
    replace_section,
    report,
    run_stages,
    write_outputs,
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
    labels = {label for label, _, _ in SPANS}
    assert set(measured["spans"]) <= labels
    assert {"contract checks", "consent gate", "profile rebuild"} <= set(measured["spans"])
    # Exclusive times: together never more than the process's CPU over the run.
    assert 0 < sum(measured["spans"].values()) <= measured["cpu_s"] * 1.01
    assert "Pipeline.process" in (tmp_path / "profile.txt").read_text()


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


def test_two_runs_of_one_checkout_write_equal_outputs_and_a_change_is_found(tmp_path):
    events = tmp_path / "events.jsonl"
    write_dataset(events, None, persons=8, events=240, seed=7, end=END)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    count = write_outputs(events, 100, tmp_path / "a.duckdb", first)
    assert write_outputs(events, 100, tmp_path / "b.duckdb", second) == count
    lines = first.read_bytes().splitlines()
    assert len(lines) == count
    topics = {orjson.loads(line)[0] for line in lines}
    # Dead letters and quality reports carry wall-clock fields: still equal without them.
    assert {"tessera.events.rejected", "tessera.quality.reports", "facts", "trait_state"} <= topics
    assert first_difference(first, second) is None

    second.write_bytes(b"\n".join(lines[:-1]) + b"\n")
    assert "more lines" in first_difference(first, second)
    lines[7] = lines[7].replace(b"tessera", b"changed", 1)
    second.write_bytes(b"\n".join(lines) + b"\n")
    assert first_difference(first, second).startswith("line 8:")


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
