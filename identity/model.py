"""The probabilistic identity model: Splink settings, unsupervised training, and scoring SQL.

Training is Splink's own (u by random sampling, m by expectation maximisation, term
frequencies); the model is Splink's settings JSON. At stream time the model's SQL is
generated once and run in the identity store's own DuckDB over each micro-batch's
candidate pairs: Splink's per-call set-up costs more than scoring a whole batch, so it is
paid once per model. The stream runs only the comparison levels as SQL (binding Splink's
whole prediction SQL cost more than running it) and applies Splink's arithmetic for match
weights and term-frequency adjustments to the levels (`weigh`), with the same result.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from identity.records import RECORD_FIELDS

# Splink imports duckdb-backed internals at import time (~1 s): only when a model is used.

DEFAULT_THRESHOLD = 0.99
UNIQUE_ID = "record_id"
# Comparison columns that carry a term-frequency adjustment (rare names weigh more).
TF_COLUMNS = ("first_name", "last_name", "city", "postcode", "email")


@dataclass(frozen=True)
class TrainingReport:
    """What training saw and produced."""

    records: int
    columns: list[str]
    probability_two_random_records_match: float
    levels: list[dict[str, Any]]  # comparison, level, m, u, match weight


def _comparisons(columns: set[str]) -> list[Any]:
    import splink.comparison_library as cl

    wanted: list[Any] = []
    if "first_name" in columns:
        wanted.append(cl.NameComparison("first_name").configure(term_frequency_adjustments=True))
    if "last_name" in columns:
        wanted.append(cl.NameComparison("last_name").configure(term_frequency_adjustments=True))
    if "dob" in columns:
        wanted.append(cl.DateOfBirthComparison("dob", input_is_string=True))
    if "email" in columns:
        wanted.append(_email_comparison())
    if "phone" in columns:
        wanted.append(cl.LevenshteinAtThresholds("phone", [1]))
    if "address_line1" in columns:
        wanted.append(cl.JaroWinklerAtThresholds("address_line1", [0.95, 0.85]))
    if "postcode" in columns:
        wanted.append(cl.ExactMatch("postcode").configure(term_frequency_adjustments=True))
    if "city" in columns:
        wanted.append(cl.ExactMatch("city").configure(term_frequency_adjustments=True))
    for strong in ("user_id", "customer_id", "anonymous_id"):
        if strong in columns:
            wanted.append(cl.ExactMatch(strong))
    return wanted


def _email_comparison() -> Any:
    """Splink's email levels, but a near miss is an edit (a typo), not Jaro-Winkler ≥ 0.88.

    Addresses are commonly built from the person's names (anna.novak7@..., anna.novak42@...):
    Jaro-Winkler on the whole address then mostly restates the name comparisons, and two
    namesakes would be counted as agreeing twice. One insertion, deletion, substitution or
    transposition is a typo of the same address, evidence the names do not already give.
    """
    import splink.comparison_level_library as cll
    import splink.comparison_library as cl
    from splink import ColumnExpression

    email = ColumnExpression("email")
    return cl.CustomComparison(
        output_column_name="email",
        comparison_levels=[
            cll.NullLevel(email),
            cll.ExactMatchLevel(email).configure(tf_adjustment_column="email"),
            cll.ExactMatchLevel(email.regex_extract("^[^@]+")).configure(
                label_for_charts="Exact match on username"
            ),
            cll.DamerauLevenshteinLevel(email, 1).configure(
                label_for_charts="One typo in the email (Damerau-Levenshtein <= 1)"
            ),
            cll.ElseLevel(),
        ],
    )


def _blocking_rules(columns: set[str]) -> list[Any]:
    from splink import block_on

    # Names are blocked on only together with a third field. Two records agreeing on
    # their names and nothing else cannot reach a linking threshold (names weigh less than
    # the prior against a match), and most such pairs are namesakes: blocking on names
    # alone scored a number of pairs that grows with the square of a name's frequency
    # and linked namesakes through term-frequency boosts.
    candidates = [
        ("email",),
        ("phone",),
        ("user_id",),
        ("customer_id",),
        ("anonymous_id",),
        ("last_name", "dob"),
        ("first_name", "dob"),
        ("postcode", "first_name"),
        ("dob", "city"),
    ]
    return [block_on(*cols) for cols in candidates if set(cols) <= columns]


PROBABILITY_FLOOR = 1e-6


@contextmanager
def _zero_probabilities_floored() -> Iterator[None]:
    """Splink 5.0's M-step can yield m near 0 for a level seen only among non-matches and then
    rejects its own value; such a level gets a floor instead: strong evidence against."""
    import splink.internals.expectation_maximisation as em

    original = em.populate_m_u_from_lookup

    def floored(fixed: Any, level: Any, name: str, lookup: dict[str, dict[int, Any]]) -> None:
        for values in lookup.get(name, {}).values():
            for key in ("m_probability", "u_probability"):
                if values.get(key) is not None and values[key] < PROBABILITY_FLOOR:
                    values[key] = PROBABILITY_FLOOR
        original(fixed, level, name, lookup)

    em.populate_m_u_from_lookup = floored
    try:
        yield
    finally:
        em.populate_m_u_from_lookup = original


def _populated_columns(conn: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    counts = conn.execute(
        "SELECT " + ", ".join(f"count({c})" for c in RECORD_FIELDS) + f" FROM {table}"
    ).fetchall()[0]
    return {c for c, n in zip(RECORD_FIELDS, counts, strict=True) if n}


def train_model(
    records: pa.Table, max_pairs: float = 2e6, seed: int = 7
) -> tuple[dict[str, Any], TrainingReport]:
    """Train a Splink model without labels on normalised identity records.

    In: an Arrow table with `record_id` and RECORD_FIELDS columns (None where unknown).
    Out: the Splink settings dict (the model) and a TrainingReport. The prior comes from
    deterministic rules, u from random sampling, m from EM sessions blocked on fields
    that leave the others free to be estimated.
    """
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    conn = duckdb.connect()
    conn.register("_records", records)
    conn.execute("CREATE TABLE records AS SELECT * FROM _records")
    columns = _populated_columns(conn, "records")
    comparisons = _comparisons(columns)
    if len(comparisons) < 2:
        raise ValueError(
            f"training needs at least two populated comparison columns, found {sorted(columns)}"
        )
    settings = SettingsCreator(
        link_type="dedupe_only",
        unique_id_column_name=UNIQUE_ID,
        comparisons=comparisons,
        blocking_rules_to_generate_predictions=_blocking_rules(columns),
        retain_intermediate_calculation_columns=True,
    )
    # Levels EM never sees are reported by Splink as warnings; the training report shows them.
    logging.getLogger("splink").setLevel(logging.ERROR)
    db_api = DuckDBAPI(conn)
    linker = Linker(db_api.register("records"), settings)
    logging.getLogger("splink").setLevel(logging.ERROR)
    deterministic = [
        rule
        for cols, rule in (
            (("email",), "l.email = r.email"),
            (("phone",), "l.phone = r.phone"),
            (("user_id",), "l.user_id = r.user_id"),
            (
                ("first_name", "last_name", "dob"),
                "l.first_name = r.first_name AND l.last_name = r.last_name AND l.dob = r.dob",
            ),
        )
        if set(cols) <= columns
    ]
    if deterministic:
        linker.training.estimate_probability_two_random_records_match(deterministic, recall=0.7)
    linker.training.estimate_u_using_random_sampling(max_pairs=max_pairs, seed=seed)
    sessions = [
        cols
        # Sessions blocked on strong identifiers see mostly true matches, so the m values
        # of names and addresses are learnt from people rather than from households.
        for cols in (("email",), ("phone",), ("dob",), ("first_name", "last_name"))
        if set(cols) <= columns
    ]
    with _zero_probabilities_floored():
        for cols in sessions[:3]:
            linker.training.estimate_parameters_using_expectation_maximisation(
                block_on(*cols), estimate_without_term_frequencies=True
            )
    model = linker.misc.save_model_to_json(out_path=None)
    conn.close()
    return model, training_report(model, records.num_rows)


def training_report(model: dict[str, Any], records: int) -> TrainingReport:
    """The match-weight summary of a model: every comparison level with m, u and weight."""
    import math

    levels = []
    for comparison in model["comparisons"]:
        for level in comparison["comparison_levels"]:
            if level.get("is_null_level"):
                continue
            m, u = level.get("m_probability"), level.get("u_probability")
            weight = math.log2(m / u) if m and u else None
            levels.append(
                {
                    "comparison": comparison["output_column_name"],
                    "level": level.get("label_for_charts", level["sql_condition"]),
                    "m": m,
                    "u": u,
                    "match_weight": weight,
                }
            )
    return TrainingReport(
        records=records,
        columns=[c["output_column_name"] for c in model["comparisons"]],
        probability_two_random_records_match=model["probability_two_random_records_match"],
        levels=levels,
    )


def save_model(model: dict[str, Any], path: Path) -> None:
    """Write the Splink settings JSON (loadable by Splink itself)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(model, option=orjson.OPT_INDENT_2))


def load_model(path: Path | str) -> dict[str, Any]:
    """Read a model written by `save_model` (or any Splink settings JSON with m and u)."""
    model = orjson.loads(Path(path).read_bytes())
    if not isinstance(model, dict) or "comparisons" not in model:
        raise ValueError(f"{path} is not a Splink settings JSON (no 'comparisons')")
    return model


class ScoringModel:
    """A trained model compiled once into DuckDB SQL that scores candidate pairs.

    `score_sql(pairs, records)` reads a relation of (`record_id_l`, `record_id_r`) pairs
    and a relation of records that carries RECORD_FIELDS plus `tf_<col>` columns, and
    yields Splink's match_weight, match_probability and per-comparison weights.
    `gamma_sql` yields the comparison levels alone, and `weigh` turns one pair's levels
    into the same weights.
    """

    def __init__(self, model: dict[str, Any], threshold: float = DEFAULT_THRESHOLD) -> None:
        from splink import SettingsCreator

        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
        self.model = model
        self.threshold = threshold
        settings = SettingsCreator.from_path_or_dict(dict(model)).get_settings("duckdb")
        settings._retain_intermediate_calculation_columns = True
        self.comparisons = [c.output_column_name for c in settings.comparisons]
        self.tf_columns = sorted(
            {
                level._tf_adjustment_input_column.unquote().name
                for c in settings.comparisons
                for level in c.comparison_levels
                if level._has_tf_adjustments
            }
        )
        self.tf_comparisons = [
            c.output_column_name
            for c in settings.comparisons
            if any(level._has_tf_adjustments for level in c.comparison_levels)
        ]
        self.blocking_conditions = [
            rule.blocking_rule_sql for rule in settings._blocking_rules_to_generate_predictions
        ]
        # Rules that are plain equalities (block_on) run from the in-memory index; any
        # other SQL condition runs as a join against the store.
        self.equality_rules = [
            cols for cols in map(equality_columns, self.blocking_conditions) if cols
        ]
        self.other_conditions = [c for c in self.blocking_conditions if not equality_columns(c)]
        # The record columns the comparisons read; `columns` adds the term-frequency ones.
        self.model_columns = sorted(
            {
                col.unquote().name
                for c in settings.comparisons
                for col in c._input_columns_used_by_case_statement
            }
        )
        self.columns = sorted(set(self.model_columns) | set(self.tf_columns))
        self._labels = {
            c.output_column_name: {
                level.comparison_vector_value: level.label_for_charts
                for level in c.comparison_levels
            }
            for c in settings.comparisons
        }
        self._settings = settings
        self._sql: dict[tuple[str, str], str] = {}
        self._weights = _MatchWeights(settings, model["probability_two_random_records_match"])

    def level_label(self, comparison: str, gamma: int) -> str:
        """The chart label of comparison level `gamma` (e.g. 'Exact match on email')."""
        return self._labels.get(comparison, {}).get(gamma, str(gamma))

    def score_sql(self, pairs: str, records: str) -> str:
        """SQL scoring every pair in relation `pairs` using record relation `records`."""
        key = (pairs, records)
        if key not in self._sql:  # Splink's SQL generation costs more than most batches
            self._sql[key] = self._generate_score_sql(pairs, records)
        return self._sql[key]

    def _generate_score_sql(self, pairs: str, records: str) -> str:
        from splink.internals.predict import predict_from_comparison_vectors_sqls_using_settings

        settings = self._settings
        blocking = ", ".join(settings._columns_to_select_for_blocking)
        vectors = ", ".join(settings._columns_to_select_for_comparison_vector_values)
        parts, predict = predict_from_comparison_vectors_sqls_using_settings(settings)
        return f"""
            WITH __splink__blocked AS (
                SELECT {blocking}, 0 AS match_key
                FROM {pairs} p
                JOIN {records} l ON l.{UNIQUE_ID} = p.{UNIQUE_ID}_l
                JOIN {records} r ON r.{UNIQUE_ID} = p.{UNIQUE_ID}_r
            ),
            __splink__df_comparison_vectors AS (SELECT {vectors} FROM __splink__blocked),
            __splink__df_match_weight_parts AS ({parts["sql"]})
            {predict["sql"]}
        """

    def gamma_sql(self, pairs: str, records: str) -> str:
        """SQL giving each pair in relation `pairs` its comparison levels (`gamma_<c>`).

        The records relation needs RECORD_FIELDS only (no term frequencies): `weigh`
        turns the levels into match weights. Binding this query costs a third of binding
        Splink's whole prediction SQL, which is most of what scoring a batch costs.
        """
        key = ("gamma", pairs, records)
        if key not in self._sql:
            columns = ", ".join(
                f'l."{c}" AS "{c}_l", r."{c}" AS "{c}_r"' for c in self.model_columns
            )
            cases = ", ".join(c._case_statement for c in self._settings.comparisons)
            self._sql[key] = f"""
                WITH __splink__blocked AS (
                    SELECT p.{UNIQUE_ID}_l, p.{UNIQUE_ID}_r, {columns}
                    FROM {pairs} p
                    JOIN {records} l ON l.{UNIQUE_ID} = p.{UNIQUE_ID}_l
                    JOIN {records} r ON r.{UNIQUE_ID} = p.{UNIQUE_ID}_r
                )
                SELECT {UNIQUE_ID}_l, {UNIQUE_ID}_r, {cases} FROM __splink__blocked
            """
        return self._sql[key]

    def weigh(
        self, gammas: dict[str, int], tf_l: dict[str, float | None], tf_r: dict[str, float | None]
    ) -> tuple[float, float, dict[str, float]]:
        """Splink's match weight and probability of one pair from its comparison levels and
        the term frequencies of both records' values; with each comparison's weight
        (level weight plus term-frequency adjustment), as Splink's prediction SQL computes
        them, term by term in the same order."""
        return self._weights.weigh(gammas, tf_l, tf_r)


class _MatchWeights:
    """The arithmetic of Splink's prediction SQL (`predict_from_comparison_vectors_sqls`)
    over a pair's comparison levels: per level its match weight, plus for exact-match levels
    with term-frequency adjustment `weight * (log2(u_exact) - log2(max(tf_l, tf_r, u_min)))`."""

    def __init__(self, settings: Any, prior: float) -> None:
        from splink.internals.misc import prob_to_match_weight

        self.prior = prob_to_match_weight(prior)
        # comparison -> (level -> match weight, level -> (tf column, weight, log2 u, min u))
        self.comparisons: list[tuple[str, dict[int, float], dict[int, tuple]]] = []
        for comparison in settings.comparisons:
            weights, adjustments = {}, {}
            levels = comparison.comparison_levels
            for level in levels:
                value = level.comparison_vector_value
                weights[value] = level._match_weight
                if (
                    value != -1
                    and level._has_tf_adjustments
                    and level._tf_adjustment_weight != 0
                    and not level._is_else_level
                ):
                    adjustments[value] = (
                        level._tf_adjustment_input_column.unquote().name,
                        float(level._tf_adjustment_weight),
                        math.log2(level._u_probability_corresponding_to_exact_match(levels)),
                        float(level._tf_minimum_u_value),
                    )
            has_tf = comparison._has_tf_adjustments
            self.comparisons.append(
                (comparison.output_column_name, weights, adjustments if has_tf else None)
            )

    def weigh(
        self, gammas: dict[str, int], tf_l: dict[str, float | None], tf_r: dict[str, float | None]
    ) -> tuple[float, float, dict[str, float]]:
        total = self.prior
        parts: dict[str, float] = {}
        for name, weights, adjustments in self.comparisons:
            gamma = gammas[name]
            weight = weights[gamma]
            total = total + weight
            if adjustments is not None:
                adjustment = 0.0
                rule = adjustments.get(gamma)
                if rule is not None:
                    column, scale, log2_u, min_u = rule
                    left, right = tf_l.get(column), tf_r.get(column)
                    if left is not None or right is not None:
                        tf = max(v for v in (left, right, min_u) if v is not None)
                        adjustment = scale * (log2_u - math.log2(tf))
                total = total + adjustment
                weight = weight + adjustment
            parts[name] = weight
        if total >= 0:
            probability = 1.0 / (1.0 + 2.0 ** (-total))
        else:
            probability = 2.0**total / (1.0 + 2.0**total)
        return total, probability, parts


_EQUALITY = re.compile(r'^\(?l\."?(\w+)"? = r\."?(\w+)"?\)?$')


def equality_columns(condition: str) -> tuple[str, ...] | None:
    """The columns of a rule that is a conjunction of `l.c = r.c` terms, else None."""
    columns = []
    for term in re.split(r"\s+AND\s+", condition.strip(), flags=re.IGNORECASE):
        match = _EQUALITY.match(term.strip())
        if not match or match.group(1) != match.group(2):
            return None
        columns.append(match.group(1))
    return tuple(columns)


def records_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Normalised records (dicts with record_id and RECORD_FIELDS) as an Arrow table."""
    rows = list(rows)
    return pa.table(
        {
            UNIQUE_ID: pa.array([r[UNIQUE_ID] for r in rows], pa.string()),
            **{f: pa.array([r.get(f) for r in rows], pa.string()) for f in RECORD_FIELDS},
        }
    )
