"""The cost curve's point: its fill, timed by tenths, makes the batches of one plain fill."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta

import orjson
import pytest

from pipelines.bench import END, cost_point, cost_section
from pipelines.bench_worker import fill_parts, returning_lines
from synthetic.events import write_dataset


@pytest.mark.parametrize(
    ("events", "batch"), [(2_000_000, 10_000), (20_000, 10_000), (1_234, 100), (50, 100)]
)
def test_fill_parts_are_runs_of_whole_batches_covering_every_event(events, batch):
    parts = fill_parts(events, batch)
    assert parts[0][0] == 0 and parts[-1][1] == events
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(parts))
    assert all(first < end for first, end in parts)
    # Every part but the last starts and ends on a batch boundary: the same batches.
    assert all(first % batch == 0 for first, _ in parts)
    assert all(end % batch == 0 for _, end in parts[:-1])
    assert len(parts) == min(10, -(-events // batch))


def test_cost_point_reports_wall_and_cpu_rates_and_the_fill_by_parts(tmp_path):
    point = cost_point(60, tmp_path / "p60", batch_size=40, probe_events=100, fill_batch=30)
    assert point["warm_events"] == 120 and point["fill_batch"] == 30 and point["batch"] == 40
    fill = point["fill"]
    assert [p["stored"] for p in fill] == [30, 60, 90, 120]
    assert sum(p["events"] for p in fill) == 120
    assert point["warm_cpu_seconds"] == pytest.approx(sum(p["cpu_seconds"] for p in fill))
    assert point["probe_events"] == 100 and point["rate"] > 0 and point["cpu_rate"] > 0
    assert point["persons_stored"] > 0
    assert 0 < point["returning_events"] <= 100 and point["returning_cpu_rate"] > 0
    assert point["rss_after_mb"] > 0 and point["state_mb"] > 0

    section = cost_section([point, point], "tessera bench --persons 60")
    assert section.startswith("## Cost curve\n")
    assert "`tessera bench --persons 60`" in section
    assert f"| 60 ({point['persons_stored']}) |" in section
    assert f"| {point['returning_cpu_rate']:,.0f} | 1.00 |" in section
    assert "| 120 |" in section  # the last tenth's row: events stored after it
    orjson.dumps(point)  # the point stays one JSON line


def test_returning_events_are_new_events_of_stored_persons_a_day_later(tmp_path):
    write_dataset(tmp_path / "warm.jsonl", None, persons=200, events=400, seed=7, end=END)
    warm = (tmp_path / "warm.jsonl").read_bytes().splitlines()
    returning = [orjson.loads(line) for line in returning_lines(warm, 300, seed=9)]
    assert len(returning) == 300
    by_id = {}
    for line in warm:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict) and "messageId" in event:
            by_id.setdefault(event["messageId"], event)
    assert len({e["messageId"] for e in returning}) == 300
    assert not {e["messageId"] for e in returning} & set(by_id)
    # Each is a stored event again: same person and content, a day later.
    stored = {
        orjson.dumps({k: v for k, v in e.items() if k not in ("messageId", "timestamp")})
        for e in by_id.values()
    }
    for event in returning:
        rest = {k: v for k, v in event.items() if k not in ("messageId", "timestamp")}
        assert orjson.dumps(rest) in stored
    times = sorted(datetime.fromisoformat(e["timestamp"]) for e in returning)
    assert times[-1] <= END + timedelta(days=1)
