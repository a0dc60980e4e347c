"""The cost curve's point: its fill, timed by tenths, makes the batches of one plain fill."""

from __future__ import annotations

import itertools

import orjson
import pytest

from pipelines.bench import cost_point, cost_section
from pipelines.bench_worker import fill_parts


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
    assert point["rss_after_mb"] > 0 and point["state_mb"] > 0

    section = cost_section([point, point], "tessera bench --persons 60")
    assert section.startswith("## Cost curve\n")
    assert "`tessera bench --persons 60`" in section
    assert f"| 60 ({point['persons_stored']}) |" in section
    assert "| 120 |" in section  # the last tenth's row: events stored after it
    orjson.dumps(point)  # the point stays one JSON line
