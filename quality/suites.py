"""Quality suites: great-expectations 1.x expectation suites run on each micro-batch.

The contract stage says an event is well-formed; the suites say its content is
believable: times inside a window around a clock the pipeline is given, amounts and ISO
4217 currencies, email and phone fields that are real, unique event ids, refunds that
agree with the order they refer to. Events are flattened into one pandas frame per batch
(never validated one by one) and each suite runs once over its source's rows.

Row-level expectations reject the failing rows with reason codes; batch-level ones
(`mostly` null rates) raise alerts and never block a row.

Referential rule for refunds: a refund whose order the pipeline has seen (earlier, or in
the same batch) must match that order's currency and not exceed its total, or it is
rejected. A refund whose order was never seen is applied and counted: orders and
refunds are partitioned by whichever id the shop sent, so a refund may legitimately
overtake its order, and rejecting it would turn late data into lost data. A batch where
fewer than `min_known_order_rate` of refunds name a known order raises an alert.

great-expectations imports in ~4.5 s: it is imported once, on the first suite built, and
runs on an ephemeral context that writes no files and needs no network. One context,
validator and set of metric graphs serve every micro-batch: each batch's frame is loaded in
place of the last, so a batch pays for the metrics of its rows, not for building GX again.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache
from typing import Any, ClassVar

import duckdb
import orjson
import pycountry

from identity.normalise import BLOCKED_EMAILS, BLOCKED_IDS, normalise_phone, region_hint
from quality.reasons import ReasonCode
from schemas.contract import Reason

# GX would otherwise try to post usage statistics; the stream must not touch the network.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

SOURCES = ("behavioral", "transactional", "support", "consent")
SOURCE_OF_KIND = {
    "order_completed": "transactional",
    "order_refunded": "transactional",
    "ticket_opened": "support",
    "ticket_closed": "support",
    "csat_submitted": "support",
    "consent_change": "consent",
}
ISO_4217 = frozenset(currency.alpha_3 for currency in pycountry.currencies)
# Values people type when a form insists on an email they will not give.
PLACEHOLDER_EMAILS = frozenset(
    BLOCKED_EMAILS
    | BLOCKED_IDS
    | {"na", "nil", "-", "--", "unknown", "noemail", "no email", "x", "xx", "xxx", "test"}
) - {""}
EMAIL_PATTERN = r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$"
# Sets as one anchored alternation: GX copies an expectation's kwargs several times per
# run, and a 178-item value_set made that copying cost more than the check itself.
ISO_4217_PATTERN = "^(?:" + "|".join(sorted(ISO_4217)) + ")$"
PLACEHOLDER_PATTERN = "(?:" + "|".join(re.escape(p) for p in sorted(PLACEHOLDER_EMAILS)) + ")$"
USABLE_EMAIL_PATTERN = "^(?!" + PLACEHOLDER_PATTERN + ")" + EMAIL_PATTERN.removeprefix("^")
E164_PATTERN = r"^\+[1-9][0-9]{6,14}$"
# The frame's text columns are plain Python objects, not pandas' Arrow-backed strings: GX
# copies the frame once per expectation when it drops null rows, and an Arrow `take` per
# column made that copy the largest part of a validation's data work.
TEXT_COLUMNS = frozenset({"message_id", "email", "phone_e164", "currency", "order_currency"})
# Failing rows come back as the frame's index, which is the row number: naming an index
# column made GX build a dict per failing row, with a `.at` lookup per column it names.
RESULT_FORMAT = {
    "result_format": "COMPLETE",
    "return_unexpected_index_query": False,  # a pandas query string nobody reads
    "partial_unexpected_count": 5,
}
# Batch alerts need rates and the first unexpected values, never the failing rows: GX's
# BASIC format leaves out the index list and index query metrics of a COMPLETE result
# (two of the six metrics it computes per expectation).
ALERT_RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 5}
QUALITY_ORDERS_SQL = """
CREATE TABLE IF NOT EXISTS quality_orders (
    order_id VARCHAR PRIMARY KEY, currency VARCHAR, total DOUBLE
)
"""


@dataclass(frozen=True)
class QualityConfig:
    """The thresholds of the suites; every one can be changed without code."""

    max_clock_skew: timedelta = timedelta(hours=1)
    # Generous on purpose: late and back-filled data is normal; 1970 and 2001 are not.
    horizon: timedelta = timedelta(days=3 * 365)
    min_anonymous_id_rate: float = 0.8  # behavioral SDKs always send one; a drop is an SDK bug
    min_known_order_rate: float = 0.5  # refunds naming an order the pipeline has seen
    min_contact_rate: float = 0.5  # support events with an email or phone

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> QualityConfig:
        """Thresholds from TESSERA_QUALITY_* variables (skew in seconds, horizon in days)."""
        env = dict(os.environ if env is None else env)
        base = cls()
        return cls(
            max_clock_skew=timedelta(
                seconds=float(
                    env.get("TESSERA_QUALITY_MAX_SKEW_S", base.max_clock_skew.total_seconds())
                )
            ),
            horizon=timedelta(
                days=float(env.get("TESSERA_QUALITY_HORIZON_DAYS", base.horizon.days))
            ),
        )


@dataclass(frozen=True)
class QualityRow:
    """One contract-valid event handed to the suites."""

    event_key: str
    kind: str
    event: dict[str, Any]
    timestamp: datetime


@dataclass(frozen=True)
class Alert:
    """A batch-level expectation that failed: recorded and exposed, never blocking."""

    suite: str
    expectation: str
    column: str
    observed: float  # share of the suite's rows that met the expectation
    threshold: float
    rows: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "expectation": self.expectation,
            "column": self.column,
            "observed": round(self.observed, 4),
            "threshold": self.threshold,
            "rows": self.rows,
        }


@dataclass
class QualityVerdict:
    """What the suites found in one batch.

    `reasons[i]` lists the reasons row i failed (empty when it passed); `results` holds
    the GX expectation results of each suite, by suite name.
    """

    reasons: list[list[Reason]]
    alerts: list[Alert] = field(default_factory=list)
    rows_by_source: Counter = field(default_factory=Counter)
    results: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    checked_at: datetime | None = None


@dataclass(frozen=True)
class _Check:
    """One expectation and what its failure means: a row reason, or a batch alert (None)."""

    expectation: Any
    reason: ReasonCode | None
    column: str


# The configurations and expectations built during the current validation, by object id.
_CONFIGURATIONS: ContextVar[dict[int, tuple[Any, tuple[Any, ...], Any]] | None] = ContextVar(
    "tessera_gx_configurations", default=None
)
# The metric graphs of the previous validation (read) and of the current one (filled).
_GRAPHS: ContextVar[tuple[dict[bytes, Any], dict[bytes, Any]] | None] = ContextVar(
    "tessera_gx_graphs", default=None
)
# The domain frames (rows a metric reads) of the current validation, by domain kwargs.
_DOMAINS: ContextVar[dict[bytes, Any] | None] = ContextVar("tessera_gx_domains", default=None)
# The validation dependencies of the previous validation (read) and the current one (filled).
_DEPENDENCIES: ContextVar[tuple[dict[bytes, Any], dict[bytes, Any]] | None] = ContextVar(
    "tessera_gx_dependencies", default=None
)


@cache
def _gx() -> tuple[Any, Any]:
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.core import id_dict
    from great_expectations.expectations import expectation
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    # GX rebuilds each expectation's configuration ~140 times per validation, running two
    # regex substitutions on the class name each time: a pure function, so memoise it
    # (a tenth of the suites' cost per batch, measured).
    expectation.camel_to_snake = lru_cache(maxsize=256)(expectation.camel_to_snake)
    # Each rebuild serialises the pydantic model (a quarter of a validation's cost).
    expectation.Expectation.configuration = property(
        _per_validation(
            expectation.Expectation.configuration.fget,
            lambda self: tuple(map(id, self.__dict__.values())),
        )
    )
    # GX also turns a configuration back into its expectation once per metric it asks
    # about (~70 per validation).
    ExpectationConfiguration.to_domain_obj = _per_validation(
        ExpectationConfiguration.to_domain_obj,
        lambda self: (
            self.type,
            *map(id, (self.id, self.meta, self.notes, self.rendered_content, self.severity)),
            id(self.description),
            *map(id, self.kwargs),
            *map(id, self.kwargs.values()),
        ),
    )
    _reuse_metric_graphs()
    _memoise_regex_parse()
    _share_domain_records()
    id_dict.convert_to_json_serializable = _plain_json(
        id_dict.convert_to_json_serializable, id_dict.IDDict
    )
    return gx, gxe


def _per_validation(
    build: Callable[[Any], Any], fields: Callable[[Any], tuple[Any, ...]]
) -> Callable[[Any], Any]:
    """`build`, kept inside QualitySuites.validate per object and the identity of its fields."""

    def kept(obj: Any) -> Any:
        memo = _CONFIGURATIONS.get()
        if memo is None:
            return build(obj)
        now = fields(obj)
        entry = memo.get(id(obj))
        if entry is None or entry[1] != now:
            entry = memo[id(obj)] = (obj, now, build(obj))  # obj pins the id
        return entry[2]

    return kept


def _reuse_metric_graphs() -> None:
    """Let GX's validator reuse an expectation's metric graph from the previous validation.

    GX builds, for every expectation of every validation, the graph of metrics it needs (a
    third of a micro-batch's validation, whatever its rows): from the configuration, the
    batch id and the runtime configuration only, never the data. Inside
    QualitySuites.validate a graph built for the same three in the previous validation is
    handed back instead; the clock expectation, whose window moves, is built anew.
    """
    from great_expectations.validator.validator import Validator

    build = Validator._generate_metric_dependency_subgraphs_for_each_expectation_configuration

    def subgraphs(
        self: Any,
        expectation_configurations: list[Any],
        processed_configurations: list[Any],
        catch_exceptions: bool,
        runtime_configuration: dict | None = None,
    ) -> tuple[list[Any], list[Any], list[Any]]:
        memo = _GRAPHS.get()
        if memo is None:
            return build(
                self,
                expectation_configurations,
                processed_configurations,
                catch_exceptions,
                runtime_configuration,
            )
        previous, current = memo
        context = orjson.dumps(
            [type(self.execution_engine).__name__, self.active_batch_id, runtime_configuration],
            option=orjson.OPT_SORT_KEYS,
        )
        graphs: list[Any] = []
        failures: list[Any] = []
        for configuration in expectation_configurations:
            key = context + _configuration_key(configuration)
            kept = current.get(key) or previous.get(key)
            if kept is None:
                # One at a time, as GX's own loop does: a configuration whose graph fails
                # yields its failed result and is not kept.
                built, failed, processed = build(
                    self, [configuration], [], catch_exceptions, runtime_configuration
                )
                failures.extend(failed)
                if not built:
                    continue
                kept = (built[0], processed[0])
            current[key] = kept
            graphs.append(kept[0])
            processed_configurations.append(kept[1])
        return graphs, failures, processed_configurations

    Validator._generate_metric_dependency_subgraphs_for_each_expectation_configuration = subgraphs


def _reuse_validation_dependencies(expectations: Sequence[Any]) -> None:
    """Let an expectation's validation dependencies be reused from the previous validation.

    After resolving the metrics, GX asks each expectation again for the metrics it needs
    (`metrics_validate`), rebuilding every metric configuration and its id: a tenth of a
    micro-batch's validation. Like the metric graphs, they come from the configuration and
    the runtime configuration only; inside QualitySuites.validate the ones built for the
    same two in the previous validation are handed back (they are only read).
    """
    wrapped: set[type] = set()
    for expectation in expectations:
        owner = next(
            cls
            for cls in type(expectation).__mro__
            if "get_validation_dependencies" in cls.__dict__
        )
        build = owner.__dict__["get_validation_dependencies"]
        if owner in wrapped or getattr(build, "_tessera_kept", False):
            continue
        wrapped.add(owner)

        def dependencies(
            self: Any,
            execution_engine: Any = None,
            runtime_configuration: dict | None = None,
            _build: Callable[..., Any] = build,
            **kwargs: Any,
        ) -> Any:
            memo = _DEPENDENCIES.get()
            if memo is None or kwargs:
                return _build(
                    self,
                    execution_engine=execution_engine,
                    runtime_configuration=runtime_configuration,
                    **kwargs,
                )
            previous, current = memo
            key = (
                type(self).__qualname__.encode()
                + orjson.dumps(runtime_configuration, option=orjson.OPT_SORT_KEYS, default=str)
                + _configuration_key(self.configuration)
            )
            kept = current.get(key) or previous.get(key)
            if kept is None:
                kept = _build(
                    self,
                    execution_engine=execution_engine,
                    runtime_configuration=runtime_configuration,
                )
            current[key] = kept
            return kept

        dependencies._tessera_kept = True  # type: ignore[attr-defined]
        owner.get_validation_dependencies = dependencies


def _configuration_key(configuration: Any) -> bytes:
    """What an expectation's configuration says, as bytes: the fields `to_json_dict` writes
    but its rendered content (GX's marshmallow dump of it, with deep copies, cost a twentieth
    of a micro-batch's validation)."""
    return orjson.dumps(
        [
            configuration.type,
            configuration.kwargs,
            configuration.meta,
            configuration.id,
            configuration.notes,
            configuration.description,
            str(configuration.severity),
        ],
        option=orjson.OPT_SORT_KEYS,
        default=str,
    )


# Domain kwargs that make GX's pandas engine drop rows (a column pair's or list's nulls).
_MULTI_COLUMN = frozenset({"column_A", "column_B", "column_list"})


def _share_domain_records() -> None:
    """Let the metrics of one validation that read the same domain share its rows.

    A column pair's domain is the frame without the rows where either column is null: GX
    drops them again for each of the four or five metrics of the pair's expectation (the
    condition, its count, values and index list, the filtered row count), a copy of the
    whole frame each time. Inside QualitySuites.validate a domain is computed once per
    domain kwargs; pandas' copy-on-write keeps a shared frame from being changed by a reader.
    """
    import pandas as pd
    from great_expectations.execution_engine import PandasExecutionEngine

    records = PandasExecutionEngine.get_domain_records

    class KeptRows(pd.DataFrame):
        """A column domain's frame that keeps the rows each boolean mask of it selected.

        GX selects a column's non-null rows (`df[df[column].notnull()]`, a copy of every
        column) for its condition, again for its unexpected values and again for its
        unexpected index list: the second and third get the first's rows. Only a mask
        aligned with this frame (its index) is looked up; any other key, and what
        the selection returns, is plain pandas.
        """

        _metadata: ClassVar[list[str]] = ["_kept"]

        @property
        def _constructor(self) -> type:
            return pd.DataFrame

        def __getitem__(self, key: Any) -> Any:
            if type(key) is pd.Series and key.dtype == bool and key.index.equals(self.index):
                mask = key.to_numpy().tobytes()
                rows = self._kept.get(mask)
                if rows is None:
                    rows = self._kept[mask] = super().__getitem__(key)
                return rows
            return super().__getitem__(key)

    def shared(self: Any, domain_kwargs: dict) -> Any:
        memo = _DOMAINS.get()
        if memo is None:
            return records(self, domain_kwargs=domain_kwargs)
        if not _MULTI_COLUMN.intersection(domain_kwargs):
            # A single column's domain, and the table's, are the frame whatever the column
            # (GX reads a column metric's values and failing rows through the table's).
            key = b"frame" + orjson.dumps(
                {k: v for k, v in domain_kwargs.items() if k != "column"},
                option=orjson.OPT_SORT_KEYS,
                default=str,
            )
            data = memo.get(key)
            if data is None:
                data = KeptRows(records(self, domain_kwargs=domain_kwargs))
                data._kept = {}
                memo[key] = data
            return data
        key = orjson.dumps(domain_kwargs, option=orjson.OPT_SORT_KEYS, default=str)
        data = memo.get(key)
        if data is None:
            data = memo[key] = records(self, domain_kwargs=domain_kwargs)
        return data

    PandasExecutionEngine.get_domain_records = shared


def _memoise_regex_parse() -> None:
    """Parse each regex once per process where pandas asks whether pyarrow can run it.

    GX matches a regex with `column.astype(str).str.contains(regex)`; on pandas' Arrow
    strings each call first parses the pattern with Python's `re` parser to pick pyarrow or
    `re` (its parse is not cached), and the suites' currency and email patterns are long
    alternations: a quarter of a micro-batch's validation. The parse is a pure function of
    the pattern; what the data decides (non-ASCII, newlines) is still asked per call.

    pandas then walks the parsed nodes four times per call, looking only at assertions,
    back references, categories and anchors: the nodes kept are those (the currency
    alternation's ~540 literals and branches answered none of its questions; its match on
    a batch's currencies, 0.30 -> 0.25 ms).
    """
    try:
        from pandas.core.arrays._arrow_string_mixins import ArrowStringArrayMixin
    except ImportError:  # a pandas without Arrow strings: nothing parsed per call
        return
    nodes = getattr(ArrowStringArrayMixin, "_regex_nodes", None)
    if nodes is None or hasattr(nodes, "cache_info"):
        return
    _parser = ArrowStringArrayMixin._re_parser()
    asked = frozenset(
        (_parser.ASSERT, _parser.ASSERT_NOT, _parser.GROUPREF, _parser.CATEGORY, _parser.AT)
    )

    def relevant(pat: str) -> list[tuple[Any, Any]]:
        return [(op, argument) for op, argument in nodes(pat) if op in asked]

    ArrowStringArrayMixin._regex_nodes = staticmethod(lru_cache(maxsize=64)(relevant))


def _plain_json(convert: Callable[[Any], Any], id_dict: type) -> Callable[[Any], Any]:
    """`convert` with plain JSON values answered first, as `convert` answers them.

    GX turns every metric's kwargs into JSON for its id (~1,400 per validation); `None`,
    the commonest value, reached `convert`'s last test after ~40 numpy and pandas ones.
    """

    def plain(data: Any) -> Any:
        kind = type(data)
        if data is None or kind is str or kind is int or kind is bool:
            return data
        if kind is float:
            return None if math.isnan(data) else data
        if kind is dict or kind is id_dict:
            return {str(key): plain(value) for key, value in data.items()}
        if kind is list or kind is tuple:
            return [plain(value) for value in data]
        return convert(data)

    return plain


def accepted_window(config: QualityConfig, now: datetime) -> tuple[float, float]:
    """The oldest and newest event time (epoch seconds) accepted when the clock reads `now`."""
    return (now - config.horizon).timestamp(), (now + config.max_clock_skew).timestamp()


def _suite_checks(config: QualityConfig, window: tuple[float, float]) -> dict[str, list[_Check]]:
    """The expectations of every suite, in the order their reasons are reported.

    `window` is the accepted event-time range, written into the clock expectation as plain
    values: a `$PARAMETER` would be parsed by GX with pyparsing on every validation, whose
    caught exceptions leave reference cycles holding the batch's frames for the collector.
    """
    _, gxe = _gx()
    oldest, newest = window
    between_clock = gxe.ExpectColumnValuesToBeBetween(
        column="ts", min_value=oldest, max_value=newest
    )
    suites = {
        # Every source: the envelope and the contact fields any event may carry.
        "envelope": [
            # Both window ends in one expectation; which end a row missed picks the reason.
            _Check(between_clock, ReasonCode.TIMESTAMP_TOO_OLD, "ts"),
            _Check(
                gxe.ExpectColumnValuesToBeUnique(column="message_id"),
                ReasonCode.DUPLICATE_EVENT_ID,
                "message_id",
            ),
            # A real address that is not a placeholder; which of the two a row missed
            # picks its reason (one expectation: each costs GX ~15 ms a batch).
            _Check(
                gxe.ExpectColumnValuesToMatchRegex(column="email", regex=USABLE_EMAIL_PATTERN),
                ReasonCode.INVALID_EMAIL,
                "email",
            ),
            # libphonenumber normalised the number while flattening ("" when it could not).
            _Check(
                gxe.ExpectColumnValuesToMatchRegex(column="phone_e164", regex=E164_PATTERN),
                ReasonCode.INVALID_PHONE,
                "phone_e164",
            ),
        ],
        "behavioral": [
            _Check(
                # True/False on behavioral rows, null elsewhere: GX leaves nulls out of
                # `mostly`, so the rate is the behavioral rows' own.
                gxe.ExpectColumnValuesToBeInSet(
                    column="has_anonymous_id", value_set=[True], mostly=config.min_anonymous_id_rate
                ),
                None,
                "has_anonymous_id",
            ),
        ],
        "transactional": [
            _Check(
                gxe.ExpectColumnValuesToBeBetween(column="amount", min_value=0),
                ReasonCode.NEGATIVE_AMOUNT,
                "amount",
            ),
            _Check(
                gxe.ExpectColumnValuesToMatchRegex(column="currency", regex=ISO_4217_PATTERN),
                ReasonCode.UNKNOWN_CURRENCY,
                "currency",
            ),
            _Check(
                gxe.ExpectColumnPairValuesToBeEqual(
                    column_A="currency",
                    column_B="order_currency",
                    ignore_row_if="either_value_is_missing",
                ),
                ReasonCode.REFUND_CURRENCY_MISMATCH,
                "order_currency",
            ),
            _Check(
                gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                    column_A="order_total",
                    column_B="amount",
                    or_equal=True,
                    ignore_row_if="either_value_is_missing",
                ),
                ReasonCode.REFUND_EXCEEDS_ORDER,
                "order_total",
            ),
            _Check(
                gxe.ExpectColumnValuesToBeInSet(
                    column="refund_order_known",
                    value_set=[True],
                    mostly=config.min_known_order_rate,
                ),
                None,
                "refund_order_known",
            ),
        ],
        "support": [
            _Check(
                gxe.ExpectColumnValuesToBeBetween(column="score", min_value=1, max_value=5),
                ReasonCode.INVALID_SCORE,
                "score",
            ),
            _Check(
                gxe.ExpectColumnValuesToBeInSet(
                    column="has_contact", value_set=[True], mostly=config.min_contact_rate
                ),
                None,
                "has_contact",
            ),
        ],
    }
    from great_expectations.expectations.expectation_configuration import parse_result_format

    for checks in suites.values():
        for check in checks:
            # Row checks name their failing rows; batch alerts need only rates and values.
            # Complete with GX's defaults: GX fills them into the configuration's own dict
            # when it reads it, so a configuration read once would differ from one read twice.
            check.expectation.result_format = parse_result_format(
                dict(RESULT_FORMAT if check.reason is not None else ALERT_RESULT_FORMAT)
            )
    return suites


class QualitySuites:
    """The GX suites, data source and batch definition, built once on an ephemeral context."""

    def __init__(self, config: QualityConfig) -> None:
        gx, _ = _gx()
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        # In-memory stores and no Data Docs site: the stream writes no files.
        self.context = gx.get_context(
            mode="ephemeral",
            project_config=DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults()),
        )
        # Progress bars would write to the worker's stderr once per batch.
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = self.context.data_sources.add_pandas("tessera_micro_batch")
        self.batch_definition = source.add_dataframe_asset(
            "events"
        ).add_batch_definition_whole_dataframe("batch")
        # The window moves with the clock: validate() writes each batch's into the suite.
        self.checks = _suite_checks(config, (0.0, 0.0))
        # The per-source suites run as one validation per micro-batch: every source-specific
        # column is null outside its source, and GX costs ~10 ms per validation and ~12 ms
        # per expectation whatever the rows, so one metric graph beats four.
        self.owners: list[tuple[str, _Check]] = [
            (name, check) for name, checks in self.checks.items() for check in checks
        ]
        combined = gx.ExpectationSuite(name="tessera.micro_batch")
        for _, check in self.owners:
            combined.add_expectation(check.expectation)
        self.suite = self.context.suites.add(combined)
        _reuse_validation_dependencies([check.expectation for _, check in self.owners])
        # The store hands back its own copy of the suite: its clock expectation is this one.
        self.window = next(
            expectation
            for expectation, (_, check) in zip(self.suite.expectations, self.owners, strict=True)
            if check.column == "ts"
        )
        self._lock = threading.Lock()  # one window in the shared suite at a time
        self._graphs: dict[bytes, Any] = {}  # the previous validation's metric graphs
        self._dependencies: dict[bytes, Any] = {}  # and its expectations' metric needs
        # The frame holds the columns the expectations read, no more (its index is the row
        # number): GX copies every column of it each time it drops an expectation's null rows.
        kwargs = [check.expectation.configuration.kwargs for _, check in self.owners]
        read = {k[key] for k in kwargs for key in ("column", "column_A", "column_B") if key in k}
        self.columns = sorted(read)
        # One GX validator for every micro-batch, each batch's frame loaded in place of the
        # last under the one batch id: a validator per batch loaded its frame as a new GX
        # batch, which fingerprints every value (a batch marker nothing here reads).
        empty = self.frame({name: [] for name in self.columns})
        self._validator = self.context.get_validator(
            batch_request=self.batch_definition.build_batch_request({"dataframe": empty})
        )

    def frame(self, columns: dict[str, list[Any]]) -> Any:
        """The pandas DataFrame the suites validate, from flatten()'s columns."""
        import pandas as pd

        return pd.DataFrame(
            {
                name: pd.Series(columns[name], dtype=object)
                if name in TEXT_COLUMNS
                else columns[name]
                for name in self.columns
            }
        )

    def validate(self, frame: Any, window: tuple[float, float]) -> list[Any]:
        """Run every suite over `frame` (a pandas DataFrame of flatten()'s columns).

        `window` is the (oldest, newest) event time accepted, in epoch seconds. Out: GX's
        expectation results, in the suite's order.
        """
        validator = self._validator
        engine = validator.execution_engine
        with self._lock:
            self.window.min_value, self.window.max_value = window
            engine.load_batch_data(validator.active_batch_id, frame)
            token = _CONFIGURATIONS.set({})
            graphs: dict[bytes, Any] = {}
            kept = _GRAPHS.set((self._graphs, graphs))
            dependencies: dict[bytes, Any] = {}
            kept_dependencies = _DEPENDENCIES.set((self._dependencies, dependencies))
            domains = _DOMAINS.set({})
            try:
                # What GX's v1 Validator.validate_expectation_suite runs on its validator.
                configurations = validator.process_expectations_for_validation(
                    self.suite.expectation_configurations
                )
                results = validator.graph_validate(
                    configurations=configurations,
                    # Each expectation carries its own result format (row checks COMPLETE,
                    # batch alerts BASIC): a runtime one would override them all.
                    runtime_configuration={},
                )
            finally:
                _DOMAINS.reset(domains)
                _DEPENDENCIES.reset(kept_dependencies)
                _GRAPHS.reset(kept)
                _CONFIGURATIONS.reset(token)
                # The engine keeps every metric it resolved, by batch id and kwargs: with one
                # batch id it held the last batch's, and the clock metrics of every window it
                # saw (a leak). No batch is validated twice.
                engine._metric_cache.clear()
            self._graphs = graphs  # the graphs this one used, no more: old windows go
            self._dependencies = dependencies
            return results


@cache
def _shared_suites(config: QualityConfig) -> QualitySuites:
    # One context per process and config: building it costs more than validating a batch.
    return QualitySuites(config)


_EMPTY: dict[str, Any] = {}  # read only: stands in for a missing object


def _first_text(places: tuple[dict[str, Any], ...], key: str) -> str | None:
    for place in places:
        value = place.get(key)
        if isinstance(value, str):
            return value
    return None


def flatten(rows: Sequence[QualityRow]) -> dict[str, list[Any]]:
    """The columns the suites read, one entry per row (None where a field does not apply)."""
    columns: dict[str, list[Any]] = {
        name: []
        for name in (
            "source",
            "message_id",
            "ts",
            "email",
            "phone",
            "phone_e164",
            "has_anonymous_id",
            "amount",
            "currency",
            "order_id",
            "is_refund",
            "score",
            "has_contact",
        )
    }
    (
        add_source,
        add_message_id,
        add_ts,
        add_email,
        add_phone,
        add_phone_e164,
        add_has_anonymous_id,
        add_amount,
        add_currency,
        add_order_id,
        add_is_refund,
        add_score,
        add_has_contact,
    ) = (column.append for column in columns.values())
    for row in rows:
        event = row.event
        kind = row.kind
        props = event.get("properties")
        props = props if isinstance(props, dict) else _EMPTY
        traits = event.get("traits")
        context = event.get("context")
        context_traits = context.get("traits") if isinstance(context, dict) else None
        # Where an email or phone may be, in the order the first one found wins.
        places = (
            traits if isinstance(traits, dict) else _EMPTY,
            context_traits if isinstance(context_traits, dict) else _EMPTY,
            props,
        )
        email = _first_text(places, "email")
        phone = _first_text(places, "phone")
        source = SOURCE_OF_KIND.get(kind, "behavioral")
        add_source(source)
        add_message_id(event.get("messageId"))
        add_ts(row.timestamp.timestamp())
        add_email(email.strip().lower() if email is not None else None)
        add_phone(phone)
        add_phone_e164(
            (normalise_phone(phone, region_hint(event)) or "") if phone is not None else None
        )
        add_has_anonymous_id(
            bool(event.get("anonymousId") or event.get("previousId"))
            if source == "behavioral"
            else None
        )
        if source == "transactional":
            add_amount(float(props["total"]))
            add_currency(props.get("currency"))
            add_order_id(props.get("order_id"))
        else:
            add_amount(None)
            add_currency(None)
            add_order_id(None)
        add_is_refund(kind == "order_refunded")
        add_score(props.get("score") if kind == "csat_submitted" else None)
        add_has_contact(bool(email or phone) if source == "support" else None)
    return columns


class QualityStage:
    """The quality stage of the pipeline: contract-valid events in, reasons and alerts out.

    Pure over a batch and the pipeline's DuckDB state (it keeps the orders it has seen in
    `quality_orders`, in the batch's transaction). `clock` is the time the window is
    measured from; the worker uses the wall clock, tests and replays of old data pass one.
    """

    def __init__(
        self,
        config: QualityConfig | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = config or QualityConfig.from_env()
        self.clock = clock or (lambda: datetime.now(UTC))
        _shared_suites(self.config)  # import GX and build the suites now, not in the first batch
        self._prepared: duckdb.DuckDBPyConnection | None = None

    def prepare(self, state: duckdb.DuckDBPyConnection) -> None:
        """Create the stage's table in `state` now, outside any batch's transaction.

        `check` on this connection then skips its `CREATE TABLE IF NOT EXISTS` (~0.5 ms a
        batch); on any other it still runs it, in the batch's transaction.
        """
        state.execute(QUALITY_ORDERS_SQL)
        self._prepared = state

    @property
    def suites(self) -> QualitySuites:
        return _shared_suites(self.config)

    def check(self, rows: Sequence[QualityRow], state: duckdb.DuckDBPyConnection) -> QualityVerdict:
        """Run every suite over one batch.

        In: the batch's contract-valid events and the pipeline's state connection (inside
        its transaction). Out: a QualityVerdict with reasons per row and batch alerts.
        """
        now = self.clock()
        verdict = QualityVerdict(reasons=[[] for _ in rows], checked_at=now)
        if not rows:
            return verdict
        started = time.perf_counter()
        columns = flatten(rows)
        stored = self._join_orders(columns, state, prepared=state is self._prepared)
        frame = self.suites.frame(columns)
        window = accepted_window(self.config, now)
        newest = window[1]
        verdict.rows_by_source.update(columns["source"])
        results = self.suites.validate(frame, window)
        for (name, check), outcome in zip(self.suites.owners, results, strict=True):
            # Results come back in suite order; a mismatch would pin reasons on wrong rows.
            assert outcome.expectation_config.type == check.expectation.expectation_type
            verdict.results.setdefault(name, []).append(outcome)
            if outcome.success:
                continue
            if check.reason is None:
                verdict.alerts.append(self._alert(name, check, outcome))
                continue
            for failed in outcome.result.get("unexpected_index_list") or ():
                index = int(failed)
                code = check.reason
                if check.column == "ts" and columns["ts"][index] > newest:
                    code = ReasonCode.TIMESTAMP_IN_FUTURE
                elif check.column == "email" and columns["email"][index] in PLACEHOLDER_EMAILS:
                    code = ReasonCode.PLACEHOLDER_EMAIL
                verdict.reasons[index].append(
                    Reason(code, _detail(code, columns, index, check.column))
                )
        self._remember_orders(rows, columns, verdict, state, stored)
        verdict.seconds = time.perf_counter() - started
        return verdict

    @staticmethod
    def _alert(suite: str, check: _Check, outcome: Any) -> Alert:
        # Percent of the non-null rows: the source's own rows (the column is null elsewhere).
        unexpected = outcome.result.get("unexpected_percent_nonmissing")
        if unexpected is None:
            unexpected = outcome.result.get("unexpected_percent") or 0.0
        met = 1.0 - float(unexpected) / 100.0
        element_count = outcome.result.get("element_count") or 0
        rows = element_count - (outcome.result.get("missing_count") or 0)
        return Alert(
            suite,
            outcome.expectation_config.type,
            check.column,
            met,
            float(check.expectation.mostly),
            rows,
        )

    @staticmethod
    def _join_orders(
        columns: dict[str, list[Any]], state: duckdb.DuckDBPyConnection, prepared: bool = False
    ) -> frozenset[str]:
        """Add the referred order's currency and total to each refund (None when unseen).

        Out: the batch's order ids the state holds already, refunds' and orders' alike (one
        read for both: `_remember_orders` then inserts only the others). `prepared`: the
        state's table exists already (`prepare`).
        """
        if not prepared:
            state.execute(QUALITY_ORDERS_SQL)
        refunds: set[str] = set()
        named: set[str] = set()
        for order_id, refund in zip(columns["order_id"], columns["is_refund"], strict=True):
            if refund:
                if order_id:
                    refunds.add(order_id)
            elif order_id is not None:
                named.add(order_id)
        known: dict[str, tuple[str, float]] = {}
        stored: frozenset[str] = frozenset()
        if refunds or named:
            found = state.execute(
                "SELECT order_id, currency, total FROM quality_orders "
                "WHERE order_id IN (SELECT unnest(?::VARCHAR[]))",
                [sorted(refunds | named)],
            ).fetchall()
            stored = frozenset(order_id for order_id, _, _ in found)
            known = {
                order_id: (currency, total)
                for order_id, currency, total in found
                if order_id in refunds
            }
        if refunds:
            # Orders earlier in this batch count as seen (first one wins, like the state).
            for order_id, refund, currency, amount in zip(
                columns["order_id"],
                columns["is_refund"],
                columns["currency"],
                columns["amount"],
                strict=True,
            ):
                if not refund and order_id in refunds and order_id not in known:
                    known[order_id] = (currency, amount)
        columns["order_currency"], columns["order_total"], columns["refund_order_known"] = (
            [],
            [],
            [],
        )
        for order_id, refund in zip(columns["order_id"], columns["is_refund"], strict=True):
            order = known.get(order_id) if refund else None
            columns["order_currency"].append(order[0] if order else None)
            columns["order_total"].append(order[1] if order else None)
            columns["refund_order_known"].append(order is not None if refund else None)
        return stored

    @staticmethod
    def _remember_orders(
        rows: Sequence[QualityRow],
        columns: dict[str, list[Any]],
        verdict: QualityVerdict,
        state: duckdb.DuckDBPyConnection,
        stored: frozenset[str],
    ) -> None:
        """Keep the batch's accepted orders the state does not hold yet (`stored`: read in
        this batch's transaction, so a plain insert meets no conflict; the first of an order
        id stays, as `ON CONFLICT DO NOTHING` kept it, for less than half its cost)."""
        orders: dict[str, tuple[str, float]] = {}
        for i, row in enumerate(rows):
            if row.kind == "order_completed" and not verdict.reasons[i]:
                # The first of an order id in the batch wins, as against the state.
                order_id = columns["order_id"][i]
                if order_id not in stored:
                    orders.setdefault(order_id, (columns["currency"][i], columns["amount"][i]))
        if orders:
            # Three list parameters unnested: executemany costs ~1 ms a row in DuckDB, and
            # registering an Arrow table costs more than the insert.
            state.execute(
                "INSERT INTO quality_orders SELECT unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), "
                "unnest(?::DOUBLE[])",
                [
                    list(orders),
                    [currency for currency, _ in orders.values()],
                    [total for _, total in orders.values()],
                ],
            )


def _detail(code: ReasonCode, columns: dict[str, list[Any]], index: int, column: str) -> str:
    value = columns[column][index]
    if column == "ts":
        shown = datetime.fromtimestamp(value, UTC).isoformat()
        return f"timestamp {shown} is outside the accepted window ({code.value})"
    if code in (ReasonCode.REFUND_CURRENCY_MISMATCH, ReasonCode.REFUND_EXCEEDS_ORDER):
        return (
            f"refund {columns['amount'][index]} {columns['currency'][index]} for order "
            f"{str(columns['order_id'][index])[:64]!r} of {columns['order_total'][index]} "
            f"{columns['order_currency'][index]}"
        )
    if column == "phone_e164":
        value = columns["phone"][index]
    return f"{column.removesuffix('_e164')} {str(value)[:64]!r} failed {code.value}"


def reason_counts(verdict: QualityVerdict) -> Counter:
    """How many rows each quality reason code rejected in a batch (primary reasons only)."""
    return Counter(reasons[0].code.value for reasons in verdict.reasons if reasons)
