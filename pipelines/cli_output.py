"""How the CLI shows long work and summaries: rich progress on stderr, tables or JSON on stdout.

Progress and messages go to stderr, so `--json` output on stdout pipes cleanly into jq.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def progress(console: Console) -> Progress:
    """A progress display for counted work (bar, count, rate, time left) or uncounted work
    (`total=None`: a spinner and the time elapsed). Transient: it leaves no trace when done."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def print_json(data: Any) -> None:
    """One JSON document on stdout (non-string keys and dataclasses are handled)."""
    sys.stdout.write(
        orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_INDENT_2).decode() + "\n"
    )
    sys.stdout.flush()


def counts_table(title: str, counts: Mapping[str, int], key: str = "name") -> Table:
    """A two-column table of counts with a total row."""
    table = Table(title=title)
    table.add_column(key)
    table.add_column("count", justify="right")
    for name, count in sorted(counts.items()):
        table.add_row(str(name), f"{count:,}")
    table.add_row("[bold]total[/]", f"[bold]{sum(counts.values()):,}[/]")
    return table
