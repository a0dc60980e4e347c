"""Identity benchmark: streaming resolver against Splink's batch path, same records, same run.

Writes (or replaces) the "Identity resolution" section of BENCHMARKS.md: accuracy
(pairwise and B-cubed) of both against the generator's truth, throughput of both,
per-batch latency of the streaming resolver, and the process's peak RSS.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

from identity.evaluate import Accuracy, accuracy, evidence_ceiling, splink_batch_clusters
from identity.model import ScoringModel, records_table, train_model
from identity.records import normalise_record, record_from_event, record_id_of
from identity.resolver import replay
from synthetic.events import generate
from synthetic.identities import identity_records

SECTION = "## Identity resolution"
# Ends the figures a bench writes into its section; what follows it (written notes, dated
# subsections) stays when the bench runs again.
GENERATED_END = "<!-- generated figures end here; the notes below stay when the bench reruns -->"


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run_identity_bench(
    records: int, threshold: float = 0.99, batch_size: int = 1000, seed: int = 1
) -> dict[str, object]:
    """The hard identity set at about `records` records: train, stream, batch. Out: figures."""
    persons = max(10, int(records / 3.7))
    rows, truth = [], {}
    for raw in identity_records(persons, seed):
        rows.append((raw["record_id"], normalise_record(raw)))
        truth[raw["record_id"]] = raw["person_id"]
    figures = compare(rows, truth, threshold, batch_size)
    return {**figures, "data": "identity set", "persons": persons}


def run_event_stream_bench(
    persons: int, events: int, threshold: float = 0.99, batch_size: int = 1000, seed: int = 7
) -> dict[str, object]:
    """The synthetic event stream (`tessera generate`): every applied event's identity record,
    in stream order, against the person the generator wrote it for. Out: figures."""
    rows, truth = [], {}
    end = datetime(2026, 11, 1, tzinfo=UTC)
    for raw, row in generate(persons, events, seed, end):
        if row.expected_outcome != "applied" or not row.person:
            continue  # rejected or withheld events never reach the identity stage
        event = orjson.loads(raw)
        rows.append((row.message_id, record_from_event(event)))
        truth[row.message_id] = row.person
    figures = compare(rows, truth, threshold, batch_size)
    return {**figures, "data": "event stream", "persons": persons}


def compare(
    rows: list[tuple[str, dict]], truth: dict[str, str], threshold: float, batch_size: int
) -> dict[str, object]:
    """Train on the distinct records, then cluster them streaming and in batch; score both."""
    distinct = {record_id_of(fields): fields for _, fields in rows}
    table = records_table({"record_id": r, **f} for r, f in distinct.items())
    started = time.perf_counter()
    model, _ = train_model(table)
    train_s = time.perf_counter() - started
    load_before = os.getloadavg()[0]
    started, cpu = time.perf_counter(), time.process_time()
    streamed = replay(rows, ScoringModel(model, threshold), batch_size=batch_size)
    stream_s = time.perf_counter() - started
    stream_cpu_s = time.process_time() - cpu
    started, cpu = time.perf_counter(), time.process_time()
    batch_of_record = splink_batch_clusters(table, model, threshold)
    batch_s = time.perf_counter() - started
    batch_cpu_s = time.process_time() - cpu
    load_after = os.getloadavg()[0]
    batch = {i: batch_of_record[record_id_of(fields)] for i, fields in rows}
    return {
        "records": len(rows),
        "distinct": len(distinct),
        "threshold": threshold,
        "batch_size": batch_size,
        "train_s": train_s,
        "stream_s": stream_s,
        "stream_cpu_s": stream_cpu_s,
        "batch_s": batch_s,
        "batch_cpu_s": batch_cpu_s,
        "load": (load_before, load_after),
        "stream": accuracy(streamed.person_of, truth),
        "ceiling": evidence_ceiling(rows, truth),
        "batch": accuracy(batch, truth),
        "p50_ms": 1000 * _percentile(streamed.batch_seconds, 0.5),
        "p99_ms": 1000 * _percentile(streamed.batch_seconds, 0.99),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _row(name: str, a: Accuracy) -> str:
    return (
        f"| {name} | {a.precision:.4f} | {a.recall:.4f} | **{a.f1:.4f}** | "
        f"{a.bcubed_f1:.4f} | {a.predicted_clusters:,} |"
    )


def _ceiling(f: dict[str, object]) -> list[str]:
    ceiling = f.get("ceiling")
    if not isinstance(ceiling, Accuracy):
        return []
    return [
        "- ceiling without links on names alone (the truth's records of one person joined "
        "wherever they share an identifier, birth date, postcode or street): pairwise "
        f"recall {ceiling.recall:.4f}, F1 {ceiling.f1:.4f} at precision 1",
    ]


def _load(f: dict[str, object]) -> str:
    before, after = f.get("load") or (0.0, 0.0)  # type: ignore[misc]
    return (
        f"machine load (1-minute load average on {os.cpu_count()} cores) {before:.1f} before "
        f"streaming, {after:.1f} after the batch run: the machine was shared with other test "
        "suites, so wall-clock rates include waiting for a core; CPU-second rates are steadier "
        "(they count DuckDB's threads too)"
    )


def render(figures: list[dict[str, object]], command: str) -> str:
    """The BENCHMARKS.md section for one or more sizes."""
    lines = [
        SECTION,
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}",
        f"- command: `{command}`",
        "- data: `tessera identity generate` (households, twins sharing address and birth date, "
        "household tablets, typos, second e-mails and phones, mixed date and phone formats); "
        "the model is trained by EM on the same records, without labels",
        "- baseline: Splink's own batch path over the same records and model in the same run "
        "(`predict` over all blocked pairs, then `cluster_pairwise_predictions_at_threshold`)",
        "",
    ]
    for f in figures:
        stream, batch = f["stream"], f["batch"]
        assert isinstance(stream, Accuracy) and isinstance(batch, Accuracy)
        records = int(f["records"])  # type: ignore[call-overload]
        stream_rate = records / float(f["stream_s"])  # type: ignore[arg-type]
        batch_rate = records / float(f["batch_s"])  # type: ignore[arg-type]
        stream_cpu = records / float(f["stream_cpu_s"])  # type: ignore[arg-type]
        batch_cpu = records / float(f.get("batch_cpu_s") or f["batch_s"])  # type: ignore[arg-type]
        what = (
            f"{records:,} records of {f['persons']:,} persons"
            if f["data"] == "identity set"
            else f"event stream: {records:,} applied events ({f['distinct']:,} distinct records) "
            f"of {f['persons']:,} persons"
        )
        lines += [
            f"### {what} (threshold {f['threshold']}, batches of {f['batch_size']:,})",
            "",
            "| clustering | pairwise precision | recall | F1 | B-cubed F1 | clusters |",
            "|---|---:|---:|---:|---:|---:|",
            _row("streaming resolver (file order, micro-batches)", stream),
            _row("Splink batch (reference)", batch),
            f"| true persons | | | | | {stream.true_clusters:,} |",
            "",
            *_ceiling(f),
            f"- streaming F1 − batch F1: **{stream.f1 - batch.f1:+.4f}** (target ≥ −0.005)",
            f"- streaming: {stream_rate:,.0f} records/s wall-clock, {stream_cpu:,.0f} records "
            f"per CPU-second of the process; per batch p50 {f['p50_ms']:.0f} ms, "
            f"p99 {f['p99_ms']:.0f} ms",
            f"- Splink batch (predict + cluster, all at once): {batch_rate:,.0f} records/s "
            f"wall-clock, {batch_cpu:,.0f} per CPU-second; ratio streaming / batch: "
            f"{stream_rate / batch_rate:.2f} wall-clock, {stream_cpu / batch_cpu:.2f} per CPU-second",
            f"- {_load(f)}",
            f"- training (u by sampling, m by EM): {f['train_s']:.1f} s; peak RSS of the run: "
            f"{f['peak_rss_mb']:,.0f} MB",
            "",
        ]
    return "\n".join([*lines, GENERATED_END, ""])


def write_section(path: Path, section: str, title: str = SECTION) -> None:
    """Replace the section `title` of BENCHMARKS.md (or append it), leaving the rest.

    When the section in the file holds `GENERATED_END`, only what comes before it is
    replaced: the notes written below it stay."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if title in text:
        start = text.index(title)
        end = text.find("\n## ", start + len(title))
        end = len(text) if end == -1 else end
        kept = text.find(GENERATED_END, start, end)
        if kept != -1 and GENERATED_END in section:
            new = section[: section.index(GENERATED_END) + len(GENERATED_END)]
            text = text[:start] + new + text[kept + len(GENERATED_END) :]
        else:
            text = text[:start] + section.rstrip() + "\n" + text[end:]
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")
