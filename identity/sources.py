"""Identity records from files: CSV or Parquet rows with a column mapping, or JSONL events.

A column named like a record field (first_name, email, dob, ...) is that field; `mapping`
maps other columns onto fields (`surname` -> last_name); every other column is ignored.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from identity.records import RECORD_FIELDS, normalise_record, record_from_event


def parse_mapping(pairs: list[str]) -> dict[str, str]:
    """`SRC=FIELD` strings as {source column: record field}; a clear error for a bad one."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        source, sep, target = pair.partition("=")
        if not sep or not source or not target:
            raise ValueError(f"--map takes SRC=FIELD, got {pair!r}")
        if target not in RECORD_FIELDS:
            raise ValueError(
                f"{target!r} is not a record field; fields: {', '.join(RECORD_FIELDS)}"
            )
        mapping[source] = target
    return mapping


def _column_plan(columns: list[str], id_column: str, mapping: dict[str, str]) -> dict[str, str]:
    if id_column not in columns:
        raise ValueError(
            f"id column {id_column!r} is not in the file; columns: {', '.join(columns)}"
        )
    missing = [c for c in mapping if c not in columns]
    if missing:
        raise ValueError(f"--map names columns the file lacks: {', '.join(missing)}")
    mapped_fields = set(mapping.values())
    plan = {c: c for c in columns if c in RECORD_FIELDS and c not in mapped_fields}
    plan.update(mapping)
    return plan


def _rows(path: Path) -> tuple[list[str], Iterator[dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        handle = path.open(newline="", encoding="utf-8-sig")
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])

        def rows() -> Iterator[dict[str, Any]]:
            with handle:
                yield from reader

        return columns, rows()
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names

        def batches() -> Iterator[dict[str, Any]]:
            for batch in parquet.iter_batches(batch_size=65_536):
                yield from batch.to_pylist()

        return columns, batches()
    raise ValueError(f"{path.name}: expected .csv, .parquet or .jsonl")


def read_records(
    path: Path, id_column: str = "record_id", mapping: dict[str, str] | None = None
) -> Iterator[tuple[str, dict[str, str | None]]]:
    """(input id, normalised record) per row of `path`, in file order.

    In: a CSV or Parquet file with an id column, or a JSONL file of events (id: messageId).
    Empty cells are missing values; dates parse from ISO, YYYYMMDD or DD/MM/YYYY.
    """
    if path.suffix.lower() == ".jsonl":
        yield from _event_records(path)
        return
    columns, rows = _rows(path)
    plan = _column_plan(columns, id_column, mapping or {})
    for row in rows:
        raw = {field: row.get(column) for column, field in plan.items()}
        raw = {k: (None if v == "" else v) for k, v in raw.items()}
        yield str(row[id_column]), normalise_record(raw)


def _event_records(path: Path) -> Iterator[tuple[str, dict[str, str | None]]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # training reads what it can; the pipeline rejects the rest
            if isinstance(event, dict):
                key = event.get("messageId")
                yield (key if isinstance(key, str) else f"line:{number}"), record_from_event(event)
