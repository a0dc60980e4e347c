"""`tessera quality ...` and `tessera schemas ...`: quality reports and contract evolution checks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

quality_app = typer.Typer(
    name="quality", help="Data-quality reports (great-expectations).", no_args_is_help=True
)
schemas_app = typer.Typer(
    name="schemas", help="Event contracts: evolution checks.", no_args_is_help=True
)
console = Console(stderr=True)


@quality_app.command("report")
def report(
    events: Annotated[
        Path, typer.Option("--events", exists=True, dir_okay=False, help="JSONL events to check")
    ],
    out: Annotated[Path, typer.Option("--out", help="folder for the Data Docs site")],
) -> None:
    """Run every quality suite over a file of events and write GX Data Docs HTML to OUT."""
    from pipelines.produce import read_lines
    from quality.report import write_data_docs
    from quality.suites import QualityConfig

    summary = write_data_docs(read_lines(events), out, QualityConfig.from_env())
    for name, success in summary.suites.items():
        console.print(f"{'passed' if success else 'FAILED':>7}  tessera.{name}")
    console.print(f"{summary.events:,} events, {summary.rows:,} contract-valid rows checked")
    console.print(f"Data Docs: {summary.index}")


@schemas_app.command("check")
def check(
    against: Annotated[
        Path | None,
        typer.Option(
            "--against", file_okay=False, help="folder of the previous contracts to compare to"
        ),
    ] = None,
    ref: Annotated[
        str, typer.Option("--ref", help="or: the git ref whose contracts are the previous ones")
    ] = "HEAD",
    schemas: Annotated[
        Path | None, typer.Option("--schemas", file_okay=False, help="the current contracts")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="list additive changes too")] = True,
) -> None:
    """Compare the current contracts with the previous ones; exit 1 on any breaking change."""
    from schemas.evolution import BREAKING, compare_folders, load_folder, load_git
    from schemas.registry import SCHEMA_ROOT, SUPPORTED_VERSIONS

    current_folder = schemas or SCHEMA_ROOT / f"v{max(SUPPORTED_VERSIONS)}"
    if against is not None:
        previous, label = load_folder(against), str(against)
    else:
        try:
            previous, label = load_git(ref, current_folder), f"git {ref}"
        except Exception as exc:  # not a checkout, or the ref does not exist
            console.print(f"[bold red]error:[/] cannot read contracts at {ref}: {exc}")
            raise typer.Exit(2) from exc
    changes = compare_folders(previous, load_folder(current_folder))
    breaking = [c for c in changes if c.severity == BREAKING]
    for change in changes:
        if change.severity == BREAKING or verbose:
            style = "bold red" if change.severity == BREAKING else None
            console.print(str(change), style=style, markup=False, highlight=False)
    console.print(
        f"{current_folder} against {label}: {len(breaking)} breaking, "
        f"{len(changes) - len(breaking)} additive change(s)"
    )
    if breaking:
        raise typer.Exit(1)
