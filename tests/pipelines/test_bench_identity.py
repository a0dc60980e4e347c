"""The identity bench rewrites its generated figures in BENCHMARKS.md and nothing else."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from identity.evaluate import accuracy
from pipelines.bench_identity import SECTION, render, write_section

BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


def _figures() -> list[dict[str, object]]:
    truth = {f"r{n}": f"p{n // 3}" for n in range(6)}
    found = {f"r{n}": f"c{min(n, 4) // 2}" for n in range(6)}
    return [
        {
            "data": "identity set",
            "records": 6,
            "persons": 2,
            "threshold": 0.99,
            "batch_size": 1000,
            "stream": accuracy(found, truth),
            "batch": accuracy(truth, truth),
            "stream_s": 1.5,
            "batch_s": 0.5,
            "stream_cpu_s": 1.0,
            "batch_cpu_s": 0.5,
            "p50_ms": 3.0,
            "p99_ms": 9.0,
            "load": (1.0, 1.5),
            "train_s": 2.0,
            "peak_rss_mb": 100.0,
        }
    ]


def _sections(text: str) -> dict[str, str]:
    """Each `## ` section of a markdown file by its heading line."""
    parts = re.split(r"(?m)^(?=## )", text)
    return {part.split("\n", 1)[0]: part for part in parts if part.startswith("## ")}


def test_a_full_run_replaces_the_generated_figures_and_keeps_the_written_notes(tmp_path):
    copy = tmp_path / "BENCHMARKS.md"
    shutil.copy(BENCHMARKS, copy)
    before = _sections(copy.read_text())
    old = before[SECTION]
    dated = re.findall(r"(?m)^### .*\(\d{4}-\d{2}-\d{2}\)$", old)
    assert dated  # the notes this test is about are in the file
    notes = old[old.index("\nRead: ") :]  # everything written below the generated figures

    new = render(_figures(), "tessera identity bench --records 6 --events 0")
    write_section(copy, new)
    after = _sections(copy.read_text())

    section = after[SECTION]
    assert "### 6 records of 2 persons" in section
    assert "### 102,498 records" not in section  # the former figures are gone
    assert section.rstrip("\n").endswith(notes.rstrip("\n"))  # the notes, word for word
    assert all(heading in section for heading in dated)
    assert {k: v for k, v in after.items() if k != SECTION} == {
        k: v for k, v in before.items() if k != SECTION
    }
    once = copy.read_text()
    write_section(copy, new)
    assert copy.read_text() == once


def test_a_section_without_written_notes_is_replaced_whole(tmp_path):
    copy = tmp_path / "BENCHMARKS.md"
    copy.write_text(f"# Benchmarks\n\n{SECTION}\n\nold figures\n\n## Next\n\nkept\n")
    write_section(copy, render(_figures(), "tessera identity bench --records 6"))
    text = copy.read_text()
    assert "old figures" not in text and "### 6 records of 2 persons" in text
    assert text.endswith("## Next\n\nkept\n")
