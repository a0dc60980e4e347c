"""The quality suites over micro-batches: row reasons, batch alerts, refunds, truth, replays."""

from __future__ import annotations

import gc
import hashlib
import json
import weakref
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import orjson
import pytest

from pipelines import topics
from pipelines.pipeline import Pipeline, SourceRecord
from quality.reasons import QUALITY_REASONS, ReasonCode
from quality.suites import QualityConfig, QualityRow, QualityStage, QualitySuites, flatten
from schemas.contract import check_contract
from synthetic.events import generate

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def order(message_id: str, order_id: str = "o-1", total: float = 10.0, **props) -> dict:
    return {
        "type": "track",
        "event": "Order Completed",
        "messageId": message_id,
        "timestamp": "2026-10-30T10:00:00Z",
        "userId": "u-1",
        "properties": {"order_id": order_id, "total": total, "currency": "EUR", **props},
    }


def refund(message_id: str, order_id: str = "o-1", total: float = 5.0, **props) -> dict:
    return {**order(message_id, order_id, total, **props), "event": "Order Refunded"}


def rows_of(*events: dict) -> list[QualityRow]:
    rows = []
    for event in events:
        contract = check_contract(orjson.dumps(event))
        assert contract.ok, contract.reasons  # the suites only ever see contract-valid events
        rows.append(
            QualityRow(event["messageId"], contract.kind, contract.event, contract.timestamp)
        )
    return rows


@pytest.fixture(scope="module")
def stage() -> QualityStage:
    return QualityStage(clock=lambda: NOW)


def codes(stage: QualityStage, *events: dict, state=None) -> list[list[str]]:
    verdict = stage.check(rows_of(*events), state or duckdb.connect())
    return [[r.code.value for r in reasons] for reasons in verdict.reasons]


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (order("m", currency="ZZZ"), "unknown_currency"),
        ({**order("m"), "timestamp": "1970-01-01T00:00:00Z"}, "timestamp_too_old"),
        ({**order("m"), "timestamp": "2026-11-01T13:30:00Z"}, "timestamp_in_future"),
        (order("m", email="n/a"), "placeholder_email"),
        (order("m", email=" TEST@test.com "), "placeholder_email"),
        (order("m", email="bob@localhost"), "invalid_email"),
        (
            {
                "type": "track",
                "event": "Ticket Opened",
                "messageId": "m",
                "userId": "u",
                "timestamp": "2026-10-30T10:00:00Z",
                "properties": {"ticket_id": "t", "phone": "12345"},
            },
            "invalid_phone",
        ),
    ],
)
def test_each_rule_rejects_its_row_with_its_reason(stage, event, reason):
    good = order("good", order_id="o-good", email="  Ann@Example.COM ")
    assert codes(stage, good, event) == [[], [reason, *codes(stage, event)[0][1:]]]
    assert reason in QUALITY_REASONS


def test_the_window_follows_the_clock_and_the_config():
    late = {**order("m"), "timestamp": "2026-11-01T12:30:00Z"}
    strict = QualityStage(QualityConfig(max_clock_skew=timedelta(minutes=10)), clock=lambda: NOW)
    relaxed = QualityStage(QualityConfig(max_clock_skew=timedelta(hours=1)), clock=lambda: NOW)
    assert codes(strict, late) == [["timestamp_in_future"]]
    assert codes(relaxed, late) == [[]]
    later = QualityStage(clock=lambda: NOW + timedelta(days=4 * 365))
    assert codes(later, order("m")) == [["timestamp_too_old"]]


def test_a_check_leaves_no_reference_cycle_holding_its_rows(stage):
    # The window is written into the suite as plain values: GX's `$PARAMETER` parser left
    # caught exceptions in cycles whose tracebacks held the checking frames and their rows.
    rows = rows_of(
        order("m-1"), refund("m-2"), {**order("m-3"), "timestamp": "1999-01-01T00:00:00Z"}
    )
    row = weakref.ref(rows[0])
    stage.check(rows_of(order("m-0")), duckdb.connect())  # the first batch builds caches
    gc.collect()
    gc.disable()
    try:
        verdict = stage.check(rows, duckdb.connect())
        del rows
        held = row() is not None  # freed by reference counting, or left for the collector
    finally:
        gc.enable()
    assert not held
    assert [[r.code.value for r in reasons] for reasons in verdict.reasons] == [
        [],
        [],
        ["timestamp_too_old"],
    ]


def _frame(suites: QualitySuites, *events: dict):
    columns = flatten(rows_of(*events))
    QualityStage._join_orders(columns, duckdb.connect())
    return suites.frame(columns)


def _outcomes(result) -> list[dict]:
    outcomes = []
    for outcome in result:
        doc = outcome.to_json_dict()
        doc["expectation_config"].pop("id")  # each suite's expectations get their own ids
        outcomes.append(doc)
    return outcomes


def test_metric_graphs_kept_from_the_previous_batch_validate_as_graphs_built_anew():
    config = QualityConfig()
    kept, built = QualitySuites(config), QualitySuites(config)
    window = (NOW - timedelta(days=30)).timestamp(), NOW.timestamp()
    kept.validate(_frame(kept, order("a-1"), order("a-2", email="n/a")), window)
    graphs = dict(kept._graphs)
    later = window[0] + 60, window[1] + 60
    events = (
        order("b-1", order_id="o-9", total=20.0, currency="ZZZ"),
        refund("b-2", order_id="o-9", total=30.0),
        refund("b-3", order_id="o-unseen"),
        order("b-1", phone="12345", email="bob@localhost"),
        {**order("b-4"), "timestamp": "1999-01-01T00:00:00Z"},
    )
    result = kept.validate(_frame(kept, *events), later)
    # Every graph but the clock expectation's, whose window moved, is the one kept.
    assert len(kept._graphs) == len(graphs) == len(kept.owners)
    assert [key for key in kept._graphs if kept._graphs[key] is not graphs.get(key)] == [
        key for key in kept._graphs if b'"column":"ts"' in key
    ]
    assert _outcomes(result) == _outcomes(built.validate(_frame(built, *events), later))
    assert not all(outcome.success for outcome in result)


def test_each_column_pair_domain_is_read_once_per_validation(monkeypatch):
    # GX drops the rows missing either column of a pair for each metric of the pair's
    # expectation; the rows a validation reads are computed once per domain.
    from great_expectations.execution_engine import PandasExecutionEngine

    suites = QualitySuites(QualityConfig())
    frame = _frame(suites, order("p-1", order_id="o-9"), refund("p-2", order_id="o-9", total=30.0))
    computed: list[tuple] = []
    records = PandasExecutionEngine.get_domain_records

    def counted(self, domain_kwargs):
        if "column_A" in domain_kwargs:
            computed.append(tuple(sorted(domain_kwargs.items())))
        return records(self, domain_kwargs)

    # Beneath the sharing: what the shared method hands to GX's own.
    monkeypatch.setattr(PandasExecutionEngine, "get_domain_records", counted)
    from quality import suites as module

    module._share_domain_records()
    window = (NOW - timedelta(days=30)).timestamp(), NOW.timestamp()
    result = suites.validate(frame, window)
    pairs = [o for o in result if "column_A" in o.expectation_config.kwargs]
    assert len(pairs) == 2
    assert len(computed) == len(set(computed)) == 2
    # And the alerts, in GX's BASIC format, still carry the figures the report reads.
    alerts = [o for o in result if "mostly" in o.expectation_config.kwargs]
    assert alerts and all("unexpected_index_list" not in o.result for o in alerts)
    assert all("element_count" in o.result and "missing_count" in o.result for o in alerts)


def test_a_columns_non_null_rows_are_selected_once_and_validate_as_gx_alone(monkeypatch):
    import inspect

    import pandas as pd
    from great_expectations.execution_engine import PandasExecutionEngine

    suites = QualitySuites(QualityConfig())
    events = (
        order("s-1", email="n/a", phone="12345"),
        order("s-2", currency="ZZZ"),
        refund("s-3", order_id="o-unseen"),
        {**order("s-4"), "timestamp": "1999-01-01T00:00:00Z"},
        order("s-5", email="ann@example.com"),
    )
    frame = _frame(suites, *events)
    window = (NOW - timedelta(days=30)).timestamp(), NOW.timestamp()
    selections: list[bytes] = []
    select = pd.DataFrame._getitem_bool_array

    def counted(self, key):
        selections.append(key.to_numpy().tobytes())
        return select(self, key)

    monkeypatch.setattr(pd.DataFrame, "_getitem_bool_array", counted)
    kept = suites.validate(frame, window)
    kept_selections = len(selections)
    # GX's own domain records, without the rows kept per validation.
    own = inspect.getclosurevars(PandasExecutionEngine.get_domain_records).nonlocals["records"]
    monkeypatch.setattr(PandasExecutionEngine, "get_domain_records", own)
    selections.clear()
    alone = suites.validate(frame, window)
    assert _outcomes(kept) == _outcomes(alone)
    assert not all(outcome.success for outcome in kept)
    # GX alone selects a column's non-null rows for each metric that reads them.
    assert len(selections) > len(set(selections))
    assert kept_selections < len(selections)


def test_the_engine_keeps_no_metric_of_a_validated_batch():
    # Every micro-batch has the same GX batch id, and the clock metrics of each window a new
    # id: kept by the engine, they would grow with every batch.
    times = iter(NOW + timedelta(seconds=n) for n in range(3))
    stage = QualityStage(clock=lambda: next(times))
    engine = stage.suites.batch_definition.data_asset.datasource.get_execution_engine()
    for n in range(3):
        verdict = stage.check(rows_of(order(f"m-{n}", email="n/a")), duckdb.connect())
        assert [[r.code.value for r in reasons] for reasons in verdict.reasons] == [
            ["placeholder_email"]
        ]
        assert len(engine._metric_cache) == 0


def test_valid_phones_in_national_format_pass_with_the_events_country(stage):
    ticket = {
        "type": "track",
        "event": "Ticket Opened",
        "messageId": "m",
        "userId": "u",
        "timestamp": "2026-10-30T10:00:00Z",
        "context": {"location": {"country": "DE"}},
        "properties": {"ticket_id": "t", "phone": "0151 23456789"},
    }
    assert codes(stage, ticket) == [[]]


def test_refunds_must_agree_with_a_known_order_and_unknown_orders_only_alert(stage):
    state = duckdb.connect()
    assert codes(stage, order("o"), state=state) == [[]]
    verdict = stage.check(
        rows_of(
            refund("r1", total=10.0),  # a full refund: fine
            refund("r2", total=10.01),  # more than the order
            refund("r3", currency="USD"),  # another currency
            refund("r4", order_id="never-seen"),  # may arrive before its order: applied
            refund("r5", order_id="never-seen-2"),
            refund("r6", order_id="never-seen-3"),
            refund("r7", order_id="never-seen-4"),
        ),
        state,
    )
    assert [[r.code for r in reasons] for reasons in verdict.reasons] == [
        [],
        [ReasonCode.REFUND_EXCEEDS_ORDER],
        [ReasonCode.REFUND_CURRENCY_MISMATCH],
    ] + [[]] * 4
    (alert,) = verdict.alerts
    assert (alert.suite, alert.column) == ("transactional", "refund_order_known")
    assert (alert.observed, alert.threshold) == (pytest.approx(3 / 7), 0.5)


def test_an_order_in_the_same_batch_is_known_to_its_refund(stage):
    assert codes(stage, order("o", order_id="o-9"), refund("r", order_id="o-9", total=99.0)) == [
        [],
        ["refund_exceeds_order"],
    ]


@pytest.mark.parametrize("prepared", [True, False])
def test_an_order_stored_before_keeps_its_first_figures_when_sent_again(prepared):
    stage = QualityStage(clock=lambda: NOW)
    state = duckdb.connect()
    if prepared:
        stage.prepare(state)  # the table made once, outside the batches
    assert codes(stage, order("a", order_id="o-1", total=10.0), state=state) == [[]]
    # The stored order again (a resent event), beside a new order sent twice in the batch.
    again = (
        order("b", order_id="o-1", total=50.0),
        order("c", order_id="o-2", total=7.0),
        order("d", order_id="o-2", total=8.0),
    )
    assert codes(stage, *again, state=state) == [[], [], []]
    assert state.execute("SELECT * FROM quality_orders ORDER BY order_id").fetchall() == [
        ("o-1", "EUR", 10.0),
        ("o-2", "EUR", 7.0),
    ]
    assert codes(stage, refund("r", order_id="o-1", total=20.0), state=state) == [
        ["refund_exceeds_order"]
    ]


def test_a_null_rate_spike_raises_an_alert_without_blocking_rows(stage):
    pages = [
        {
            "type": "page",
            "messageId": f"p{i}",
            "userId": f"u{i}",
            "timestamp": "2026-10-30T10:00:00Z",
        }
        for i in range(10)
    ]
    verdict = stage.check(rows_of(*pages), duckdb.connect())
    assert all(not reasons for reasons in verdict.reasons)
    (alert,) = verdict.alerts
    assert (alert.suite, alert.column, alert.observed, alert.rows) == (
        "behavioral",
        "has_anonymous_id",
        0.0,
        10,
    )


def test_quality_rejections_are_dead_letters_with_original_bytes_and_headers(run):
    bad = orjson.dumps(order("bad-1", currency="ZZZ"))
    report = run.feed(bad, orjson.dumps(order("ok-1", order_id="o-2")), topic=topics.TRANSACTIONAL)
    assert dict(report.outcomes) == {"rejected": 1, "applied": 1}
    (dead,) = run.on(topics.REJECTED)
    headers = dict(dead.headers)
    assert dead.value == bad and dead.key == b"bad-1"
    assert headers["tessera.reason"] == b"unknown_currency"
    assert [r["code"] for r in orjson.loads(headers["tessera.reasons"])] == ["unknown_currency"]
    assert headers["tessera.schema"] == b"order_completed/v1"
    assert headers["tessera.source.topic"] == topics.TRANSACTIONAL.encode()
    assert datetime.fromisoformat(headers["tessera.rejected_at"].decode()).tzinfo is not None
    (quality,) = [orjson.loads(r.value) for r in run.on(topics.QUALITY_REPORTS)]
    assert quality["rejected"] == [
        {"topic": topics.TRANSACTIONAL, "reason": "unknown_currency", "count": 1}
    ]
    assert quality["suites"]["transactional"]["success"] is False


def test_a_fixed_version_of_a_rejected_event_gets_its_own_outcome_once(run):
    bad = order("fix-1", currency="ZZZ")
    run.feed(bad, topic=topics.TRANSACTIONAL)
    fixed = orjson.dumps(order("fix-1", currency="EUR"))
    assert dict(run.feed(fixed, topic=topics.TRANSACTIONAL).outcomes) == {"applied": 1}
    again = run.feed(fixed, orjson.dumps(bad), topic=topics.TRANSACTIONAL)
    assert again.received == 0 and again.duplicates == 2


def test_an_applied_event_reused_with_other_content_is_still_a_duplicate_id(run):
    run.feed(order("same-1"), topic=topics.TRANSACTIONAL)
    report = run.feed(order("same-1", total=99.0), topic=topics.TRANSACTIONAL)
    assert dict(report.outcomes) == {"rejected": 1}


def test_quality_off_lets_content_errors_through(tmp_path: Path):
    pipeline = Pipeline(tmp_path / "off.duckdb", quality=False)
    outputs = []
    raw = orjson.dumps(order("m", currency="ZZZ"))
    report = pipeline.process([SourceRecord(topics.TRANSACTIONAL, 0, 0, raw)], outputs.extend)
    pipeline.close()
    assert dict(report.outcomes) == {"applied": 1}
    assert not [o for o in outputs if o.topic == topics.QUALITY_REPORTS]


def test_the_generators_truth_matches_every_outcome_line_by_line(tmp_path: Path):
    lines = list(generate(persons=120, events=3000, seed=5, end=datetime(2026, 11, 1, tzinfo=UTC)))
    pipeline = Pipeline(tmp_path / "truth.duckdb")
    outputs = []
    records = [SourceRecord(row.topic, 0, n, raw) for n, (raw, row) in enumerate(lines)]
    for start in range(0, len(records), 500):
        pipeline.process(records[start : start + 500], outputs.extend)
    pipeline.close()
    got = Counter(
        dict(o.headers)["tessera.reason"].decode() for o in outputs if o.topic == topics.REJECTED
    )
    want = Counter(row.expected_reason for _, row in lines if row.expected_outcome == "rejected")
    assert got == want
    assert {"unknown_currency", "timestamp_in_future", "invalid_email"} <= set(got)


def test_thresholds_come_from_the_environment():
    config = QualityConfig.from_env(
        {"TESSERA_QUALITY_MAX_SKEW_S": "60", "TESSERA_QUALITY_HORIZON_DAYS": "30"}
    )
    assert (config.max_clock_skew, config.horizon) == (timedelta(seconds=60), timedelta(days=30))
    assert QualityConfig.from_env({}) == QualityConfig()


def test_plain_json_ids_convert_as_great_expectations_does(stage):
    from great_expectations import util
    from great_expectations.core import id_dict

    from quality.suites import _plain_json

    plain = _plain_json(util.convert_to_json_serializable, id_dict.IDDict)
    values = [
        None,
        "ts",
        3,
        True,
        2.5,
        float("nan"),
        {"column": "ts", 1: None, "nested": {"mostly": 0.8, "set": [True, None]}},
        id_dict.IDDict({"batch_id": "b", "row_condition": None}),
        ("row", 1.0),
        {1, 2},
        datetime(2026, 1, 1, tzinfo=UTC),
        ReasonCode.INVALID_EMAIL,
    ]
    for value in values:
        assert plain(value) == util.convert_to_json_serializable(value), value
    # The id GX derives from a metric's kwargs is the same with the fast path installed.
    kwargs = id_dict.IDDict({"column": "ts", "min_value": 1.5, "condition_parser": None})
    assert id_dict.convert_to_json_serializable is not util.convert_to_json_serializable
    assert (
        kwargs.to_id()
        == hashlib.md5(
            json.dumps(util.convert_to_json_serializable(dict(kwargs)), sort_keys=True).encode()
        ).hexdigest()
    )
