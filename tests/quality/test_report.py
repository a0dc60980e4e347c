"""`tessera quality report`: great-expectations Data Docs over a file of events."""

from __future__ import annotations

from datetime import UTC, datetime

from quality.report import write_data_docs
from synthetic.events import generate


def test_data_docs_render_every_suite_with_its_failures(tmp_path):
    lines = [raw for raw, _ in generate(50, 1200, seed=2, end=datetime(2026, 11, 1, tzinfo=UTC))]
    summary = write_data_docs(
        lines, tmp_path / "docs", clock=lambda: datetime(2026, 11, 2, tzinfo=UTC)
    )
    assert summary.events == 1200 and 1000 < summary.rows < 1200
    # The generator's unknown currencies and 1970/far-future times fail two suites.
    assert summary.suites["envelope"] is False and summary.suites["transactional"] is False
    assert summary.suites["support"] is True
    index = summary.index.read_text()
    pages = list((tmp_path / "docs" / "validations").rglob("*.html"))
    assert len(pages) == len(summary.suites)
    assert "tessera.transactional" in index
    (transactional,) = [p for p in pages if "transactional" in p.parts]
    assert "ZZZ" in transactional.read_text()  # the unexpected values are shown
