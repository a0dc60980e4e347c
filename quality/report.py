"""`tessera quality report`: GX Data Docs (HTML) for the quality suites over a file of events.

Data Docs need a file-backed GX context (they are rendered from stored validation
results), so this builds one in a temporary directory, runs each suite as a checkpoint
with an UpdateDataDocsAction over the file's contract-valid events, and copies the
rendered site to the output folder. Nothing is written outside those two places.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb

from quality.suites import (
    QualityConfig,
    QualityRow,
    QualityStage,
    _suite_checks,
    accepted_window,
    flatten,
)
from schemas.contract import check_contract


@dataclass
class ReportSummary:
    """What the report covered: events read, contract-valid rows, suites and their success."""

    events: int
    rows: int
    suites: dict[str, bool]
    index: Path


def write_data_docs(
    events: Iterable[bytes], out: Path, config: QualityConfig | None = None, clock=None
) -> ReportSummary:
    """Validate `events` (raw bytes) with every suite and write Data Docs HTML under `out`.

    Out: a ReportSummary whose `index` is the site's index.html.
    """
    import great_expectations as gx
    import pandas as pd
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    stage = QualityStage(config, clock)
    rows, count = [], 0
    for raw in events:
        count += 1
        contract = check_contract(raw)
        if contract.ok:
            rows.append(
                QualityRow(
                    contract.event["messageId"],  # type: ignore[index]
                    contract.kind,  # type: ignore[arg-type]
                    contract.event,  # type: ignore[arg-type]
                    contract.timestamp,  # type: ignore[arg-type]
                )
            )
    columns = flatten(rows)
    stage._join_orders(columns, duckdb.connect())
    frame = pd.DataFrame(columns)
    window = accepted_window(stage.config, stage.clock())
    results: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="tessera-gx-") as scratch:
        context = gx.get_context(mode="file", project_root_dir=scratch)
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas("tessera_events").add_dataframe_asset("events")
        for name, checks in _suite_checks(stage.config, window).items():
            part = frame if name == "envelope" else frame[frame["source"] == name]
            if part.empty:
                continue
            batch_definition = asset.add_batch_definition_whole_dataframe(name)
            suite = gx.ExpectationSuite(name=f"tessera.{name}")
            for check in checks:
                suite.add_expectation(check.expectation)
            suite = context.suites.add(suite)
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=f"tessera.{name}", data=batch_definition, suite=suite)
            )
            checkpoint = context.checkpoints.add(
                gx.Checkpoint(
                    name=f"tessera.{name}.report",
                    validation_definitions=[definition],
                    actions=[UpdateDataDocsAction(name="data_docs")],
                    result_format={"result_format": "SUMMARY"},
                )
            )
            run = checkpoint.run(batch_parameters={"dataframe": part})
            results[name] = bool(run.success)
        site = Path(scratch) / "gx" / "uncommitted" / "data_docs" / "local_site"
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(site, out)
    return ReportSummary(count, len(rows), results, out / "index.html")
