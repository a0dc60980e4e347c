"""Accuracy of a clustering against the truth, and Splink's batch clustering as reference.

Pairwise precision/recall/F1 count pairs of records put in one cluster; B-cubed averages,
per record, how much of its predicted cluster is its true cluster (precision) and how
much of its true cluster it was put with (recall).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from identity.model import UNIQUE_ID
from identity.records import STRONG_FIELDS


@dataclass(frozen=True)
class Accuracy:
    """How well predicted clusters match the true ones."""

    records: int
    precision: float
    recall: float
    f1: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f1: float
    predicted_clusters: int
    true_clusters: int


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def accuracy(predicted: dict[str, str], truth: dict[str, str]) -> Accuracy:
    """Compare record -> cluster maps over the records both know.

    Pairs are counted from cluster sizes (no pair list), so a million records is cheap.
    """
    records = [r for r in truth if r in predicted]
    pred_sizes = Counter(predicted[r] for r in records)
    true_sizes = Counter(truth[r] for r in records)
    both = Counter((predicted[r], truth[r]) for r in records)
    true_positive = sum(n * (n - 1) // 2 for n in both.values())
    predicted_pairs = sum(n * (n - 1) // 2 for n in pred_sizes.values())
    true_pairs = sum(n * (n - 1) // 2 for n in true_sizes.values())
    precision = true_positive / predicted_pairs if predicted_pairs else 1.0
    recall = true_positive / true_pairs if true_pairs else 1.0
    # B-cubed: a record in cell (p, t) of size n scores n/|p| precision and n/|t| recall.
    b_precision = sum(n * n / pred_sizes[p] for (p, _), n in both.items()) / len(records)
    b_recall = sum(n * n / true_sizes[t] for (_, t), n in both.items()) / len(records)
    return Accuracy(
        records=len(records),
        precision=precision,
        recall=recall,
        f1=_f1(precision, recall),
        bcubed_precision=b_precision,
        bcubed_recall=b_recall,
        bcubed_f1=_f1(b_precision, b_recall),
        predicted_clusters=len(pred_sizes),
        true_clusters=len(true_sizes),
    )


def splink_batch_clusters(
    records: pa.Table, model: dict[str, Any], threshold: float
) -> dict[str, str]:
    """Splink's own batch path: predict over all blocked pairs, cluster at `threshold`.

    In: normalised records (record_id + RECORD_FIELDS), a trained model. Out: record_id ->
    cluster id. Term frequencies are computed over the whole set, as batch Splink does.
    """
    from splink import DuckDBAPI, Linker

    logging.getLogger("splink").setLevel(logging.ERROR)
    conn = duckdb.connect()
    conn.register("_records", records)
    conn.execute("CREATE TABLE records AS SELECT * FROM _records")
    linker = Linker(DuckDBAPI(conn).register("records"), dict(model))
    predictions = linker.inference.predict(threshold_match_probability=threshold)
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(
        predictions, threshold_match_probability=threshold
    )
    rows = conn.execute(f"SELECT {UNIQUE_ID}, cluster_id FROM {clusters.physical_name}").fetchall()
    conn.close()
    return {str(r): str(c) for r, c in rows}


def cluster_sizes(assignment: dict[str, str]) -> dict[int, int]:
    """How many clusters have each size (for summaries)."""
    sizes: dict[str, int] = defaultdict(int)
    for cluster in assignment.values():
        sizes[cluster] += 1
    return dict(sorted(Counter(sizes.values()).items()))


# What two records of one person can share beyond their names: identifiers, and the
# attributes that tell namesakes apart.
_EVIDENCE_FIELDS = (*STRONG_FIELDS, "dob", "postcode", "address_line1")


def evidence_ceiling(
    rows: list[tuple[str, dict[str, str | None]]], truth: dict[str, str]
) -> Accuracy:
    """An upper bound for any resolver that never links on names alone.

    Each true person's records are joined where two share an identifier, a birth date, a
    postcode or a street (more generous than any safe rule: a household shares the last
    three). Records of one person that only their names connect stay apart. Out: the
    accuracy of that clustering (precision 1 by construction; its recall is the ceiling).
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for input_id, fields in rows:
        for name in _EVIDENCE_FIELDS:
            if fields.get(name):
                key = f"{truth[input_id]}\x1f{name}\x1f{fields[name]}"
                parent[find(input_id)] = find(key)
    return accuracy({i: find(i) for i, _ in rows}, truth)
