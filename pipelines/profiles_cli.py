"""`tessera profiles ...`: the profile API benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

profiles_app = typer.Typer(help="The profile store and API.", no_args_is_help=True)
console = Console(stderr=True)


@profiles_app.command("bench")
def bench(
    profiles: Annotated[int, typer.Option(min=1, help="profiles to store")] = 1_000_000,
    rates: Annotated[str, typer.Option(help="lookup rates per second, comma-separated")] = (
        "1000,100"
    ),
    seconds: Annotated[float, typer.Option(min=1, help="seconds per rate")] = 60,
    out: Annotated[Path, typer.Option(help="report to write")] = Path("BENCHMARKS.md"),
    workdir: Annotated[Path, typer.Option(help="scratch space")] = Path(".tessera/bench-profiles"),
    reuse_store: Annotated[
        bool, typer.Option(help="keep a store of as many profiles left in WORKDIR by a run before")
    ] = False,
) -> None:
    """Lookup latency against N stored profiles vs the trivial endpoint; store size and RSS."""
    from pipelines.bench_profiles import run_profiles_bench, write_report

    command = " ".join(["tessera", *sys.argv[1:]])
    offered = [float(r) for r in rates.split(",") if r.strip()]
    with console.status(f"loading {profiles:,} profiles, then {len(offered)} load runs"):
        figure = run_profiles_bench(profiles, offered, seconds, workdir, reuse_store)
    write_report(out, figure, command)
    console.print_json(json.dumps(figure))
    console.print(f"written to {out}")
