"""Computed traits: declared in YAML, maintained incrementally as events arrive.

Each applied event adds to a few accumulator rows, keyed by (person, identity record,
ingestion purpose, jurisdiction, trait, bucket): a count, an exact amount, the first and
last event time, and the value of the latest event. A bucket is what a trait needs to
stay exact when rows are added: a UTC day for windowed traits, an order id for values
that count each order once, a currency for refunds. Because every row belongs to one
identity record, a merge or a split moves rows rather than recounting them, and because
it belongs to one (purpose, jurisdiction), a consent change only changes which rows a
view adds up. A view is the roll-up of its allowed rows, never a rescan of events: DuckDB
sums the rows per trait (per day for windowed traits), `rollup` turns those totals into
the view's traits, and views of a person that allow the same rows share one roll-up.
Traits whose events would add the same rows as another's (`TraitCatalog.row_families`)
are read through that trait's rows rather than written.

Two clocks, kept apart: buckets are event time (the day an event happened); windows and
`days_since` are evaluated when read (`at_read`), against the reader's clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import cache, cached_property
from operator import neg
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import yaml

TRAITS_PATH = Path(__file__).with_name("traits.yaml")
OPS = (
    "count",
    "distinct_count",
    "sum",
    "mean",
    "first_time",
    "last_time",
    "latest",
    "top",
    "open_count",
    "days_since",
)
WINDOWED_OPS = ("count", "distinct_count")
FIELD_OPS = ("distinct_count", "sum", "mean", "latest", "top", "open_count")
MERGE_STRATEGIES = ("latest", "first", "max", "sum", "union")
CENT = Decimal("0.01")
SESSION_SLOT_S = 30 * 60  # without a context.sessionId, a session is a device's 30-minute slot
SEEN = "_seen"  # every event: which (record, purpose, jurisdiction) groups a person has


class TraitConfigError(ValueError):
    """The traits file is not usable; the message lists every problem found."""


@dataclass(frozen=True)
class TraitSpec:
    """One computed trait as declared."""

    name: str
    op: str
    kinds: frozenset[str] = frozenset()
    fields: tuple[str, ...] = ()
    group_by: str | None = None
    distinct_by: str | None = None
    subtract_kinds: frozenset[str] = frozenset()
    close_kinds: frozenset[str] = frozenset()
    window_days: int | None = None
    k: int = 5
    of: str | None = None

    def matches(self, kind: str) -> bool:
        return "*" in self.kinds or kind in self.kinds


@dataclass(frozen=True)
class TraitCatalog:
    """Every computed trait and how identify traits merge."""

    computed: tuple[TraitSpec, ...]
    default_strategy: str = "latest"
    strategies: dict[str, str] = field(default_factory=dict)
    _by_kind: dict[frozenset[str], dict[str, KindPlan]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _reads: dict[date, tuple[tuple[str, str, str | None], ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def strategy(self, name: str) -> str:
        return self.strategies.get(name, self.default_strategy)

    @property
    def names(self) -> set[str]:
        return {spec.name for spec in self.computed}

    @property
    def max_window(self) -> int:
        return max((s.window_days or 0 for s in self.computed), default=0)

    @cached_property
    def window_twins(self) -> dict[str, str]:
        """Windowed traits that differ from another only in their window, each mapped to
        the first of its kind: they add to the same daily buckets, and a roll-up keeps the
        same days for every window (after the longest), so one's days serve both (the
        builder reads each through the one its store holds: `row_families`)."""
        firsts: dict[tuple[str, frozenset[str], tuple[str, ...]], str] = {}
        twins = {}
        for spec in sorted(self.computed, key=lambda s: s.name):
            if spec.window_days:
                first = firsts.setdefault((spec.op, spec.kinds, spec.fields), spec.name)
                if first != spec.name:
                    twins[spec.name] = first
        return twins

    @cached_property
    def default_rollup(self) -> RollupPlan:
        """The catalog's `rollup_plan` with window twins read through the trait they twin."""
        return rollup_plan(self)

    @cached_property
    def row_families(self) -> tuple[tuple[str, ...], ...]:
        """Sets of traits whose events add the same accumulator rows, so that one trait's
        rows serve them all (`ProfileBuilder` writes one and reads the others through it):
        counts, first and last times of the same kinds (`SEEN` with those of every kind),
        window twins, sums and means of one amount (a mean reads a sum's additions alone),
        and traits of one op over the same field and kinds. Each family lists the traits
        that may hold its rows first: `SEEN`, then sums, then the others, each by name."""
        families: dict[tuple, list[str]] = {}
        amounts: dict[tuple, list[tuple]] = {}  # the sum families of each amount
        for spec in self.computed:
            key = _rows_key(spec)
            if key is None:
                continue
            families.setdefault(key, []).append(spec.name)
            if spec.op == "sum":
                amounts.setdefault(key[:-1], []).append(key)
        for key in [k for k in families if k[0] == "amount" and k[-1] is None]:
            sums = sorted(amounts.get(key[:-1], []), key=lambda k: min(families[k]))
            if sums:  # means join the first sum family of their amount
                families[sums[0]] += families.pop(key)
        if ("event", frozenset({"*"}), False) in families:
            families[("event", frozenset({"*"}), False)].append(SEEN)
        by_name = {spec.name: spec for spec in self.computed}

        def order(name: str) -> tuple[bool, bool, str]:
            return name != SEEN, by_name[name].op != "sum" if name != SEEN else False, name

        return tuple(
            sorted(tuple(sorted(names, key=order)) for names in families.values() if len(names) > 1)
        )

    def plan_for(self, kind: str, unwritten: frozenset[str] = frozenset()) -> KindPlan:
        """What an event of `kind` adds to, worked out once per kind (`accumulate`), less
        the rows of `unwritten` traits (read through another's: `row_families`)."""
        plans = self._by_kind.setdefault(unwritten, {})
        plan = plans.get(kind)
        if plan is None:
            plan = plans[kind] = _plan(self.computed, kind, unwritten)
        return plan


class KindPlan(NamedTuple):
    """The accumulator rows an event kind adds to. fixed: (trait, daily) of the rows whose
    bucket is '' or the event's day; steps: (traits, spec, side) of the rows read from the
    event, traits that add the same rows (twins, a sum and a mean of one field) sharing
    one step; side: '+' / '-' for amounts, 'open' / 'close' for open_count, else ''."""

    fixed: tuple[tuple[str, bool], ...]
    steps: tuple[tuple[tuple[str, ...], TraitSpec, str], ...]
    daily: bool


def _rows_key(spec: TraitSpec) -> tuple | None:
    """What decides the accumulator rows of a trait (`TraitCatalog.row_families`); None for
    a trait without rows. A sum's key ends with what it subtracts, a mean's with None."""
    kinds = frozenset({"*"}) if "*" in spec.kinds else spec.kinds
    if spec.op in ("count", "first_time", "last_time"):
        return ("event", kinds, bool(spec.window_days))
    if spec.op in ("sum", "mean"):
        subtracts = spec.subtract_kinds if spec.op == "sum" else None
        return ("amount", kinds, spec.fields[0], spec.group_by, spec.distinct_by, subtracts)
    if spec.op == "latest":
        return ("latest", kinds, spec.fields[0])
    if spec.op == "open_count":
        return ("open", kinds, spec.close_kinds, spec.fields[0])
    if spec.op in ("distinct_count", "top"):
        return ("values", kinds, spec.fields, bool(spec.window_days))
    return None


def _plan(
    computed: tuple[TraitSpec, ...], kind: str, unwritten: frozenset[str] = frozenset()
) -> KindPlan:
    fixed: list[tuple[str, bool]] = [(SEEN, False)]
    steps: dict[tuple, tuple[list[str], TraitSpec, str]] = {}
    for spec in computed:
        if spec.op == "days_since" or spec.name in unwritten:
            continue
        side = ""
        if spec.op in ("sum", "mean"):
            side = "+" if spec.matches(kind) else "-" if kind in spec.subtract_kinds else ""
            if not side or (side == "-" and spec.op == "mean"):
                continue
            key: tuple = ("amount", spec.fields[0], spec.group_by, spec.distinct_by, side)
        elif spec.op == "open_count":
            side = "open" if spec.matches(kind) else "close" if kind in spec.close_kinds else ""
            if not side:
                continue
            key = ("open", spec.fields[0], side)
        elif not spec.matches(kind):
            continue
        elif spec.op in ("count", "first_time", "last_time"):
            fixed.append((spec.name, spec.op == "count" and bool(spec.window_days)))
            continue
        elif spec.op == "latest":
            key = ("latest", spec.fields[0])
        else:  # distinct_count, top: one row per value, per day when windowed
            key = ("values", spec.fields, bool(spec.window_days))
        steps.setdefault(key, ([], spec, side))[0].append(spec.name)
    return KindPlan(
        tuple(fixed),
        tuple((tuple(names), spec, side) for names, spec, side in steps.values()),
        any(daily for _, daily in fixed) or any(spec.window_days for _, spec, _ in steps.values()),
    )


def load_traits(
    path: Path | str | None = None, known_kinds: set[str] | None = None
) -> TraitCatalog:
    """Read and validate a traits file (default: the packaged profiles/traits.yaml).

    In: the YAML path and, optionally, the event kinds that exist. Out: a TraitCatalog.
    Raises TraitConfigError listing every problem, each prefixed by the trait's name.
    """
    path = Path(path) if path else TRAITS_PATH
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TraitConfigError(f"cannot read traits {path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("computed"), dict):
        raise TraitConfigError(f"{path}: `computed` must be a mapping of trait name to spec")
    problems: list[str] = []
    specs: list[TraitSpec] = []
    for name, raw in doc["computed"].items():
        spec = _spec(str(name), raw, known_kinds, problems)
        if spec is not None:
            specs.append(spec)
    names = {s.name for s in specs}
    for spec in specs:
        if spec.op == "days_since":
            target = next((s for s in specs if s.name == spec.of), None)
            if target is None or target.op not in ("first_time", "last_time"):
                problems.append(f"{spec.name}: `of` must name a first_time or last_time trait")
    identify = doc.get("identify_traits") or {}
    if not isinstance(identify, dict):
        problems.append("identify_traits: must be a mapping")
        identify = {}
    default = identify.get("default", "latest")
    if default not in MERGE_STRATEGIES:
        problems.append(f"identify_traits.default: must be one of {MERGE_STRATEGIES}")
    strategies = identify.get("strategies") or {}
    if not isinstance(strategies, dict):
        problems.append("identify_traits.strategies: must be a mapping of trait to strategy")
        strategies = {}
    for trait, strategy in strategies.items():
        if strategy not in MERGE_STRATEGIES:
            problems.append(
                f"identify_traits.{trait}: {strategy!r} is not one of {MERGE_STRATEGIES}"
            )
    if len(names) != len(specs):
        problems.append("computed: trait names must be unique")
    if problems:
        raise TraitConfigError(f"invalid traits in {path}:\n  - " + "\n  - ".join(problems))
    return TraitCatalog(tuple(specs), default, {str(k): str(v) for k, v in strategies.items()})


def _kinds(value: Any) -> frozenset[str] | None:
    if value is None:
        return frozenset()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    return None


def _spec(
    name: str, raw: Any, known_kinds: set[str] | None, problems: list[str]
) -> TraitSpec | None:
    if not isinstance(raw, dict):
        problems.append(f"{name}: must be a mapping with an `op`")
        return None
    unknown = set(raw) - {
        "op",
        "kinds",
        "field",
        "group_by",
        "distinct_by",
        "subtract_kinds",
        "close_kinds",
        "window_days",
        "k",
        "of",
    }
    if unknown:
        problems.append(f"{name}: unknown keys {sorted(unknown)}")
    op = raw.get("op")
    if op not in OPS:
        problems.append(f"{name}: op must be one of {OPS}")
        return None
    kinds = {key: _kinds(raw.get(key)) for key in ("kinds", "subtract_kinds", "close_kinds")}
    for key, value in kinds.items():
        if value is None:
            problems.append(f"{name}: {key} must be a list of event kinds")
        elif known_kinds is not None:
            for kind in sorted(value - known_kinds - {"*"}):
                problems.append(f"{name}: unknown event kind {kind!r} in {key}")
    if op != "days_since" and not kinds["kinds"]:
        problems.append(f"{name}: kinds must name at least one event kind (or '*')")
    fields = raw.get("field")
    fields = [fields] if isinstance(fields, str) else fields
    if op in FIELD_OPS and (not fields or not all(isinstance(f, str) for f in fields)):
        problems.append(f"{name}: op {op} needs a `field` (a property path or a list of them)")
    window = raw.get("window_days")
    if window is not None and (op not in WINDOWED_OPS or not isinstance(window, int) or window < 1):
        problems.append(f"{name}: window_days must be a positive integer, on {WINDOWED_OPS} only")
    if op in ("sum", "mean") and not raw.get("group_by"):
        problems.append(
            f"{name}: op {op} needs `group_by` (amounts in different currencies never add)"
        )
    if op == "open_count" and not kinds["close_kinds"]:
        problems.append(f"{name}: open_count needs close_kinds")
    k = raw.get("k", 5)
    if not isinstance(k, int) or k < 1:
        problems.append(f"{name}: k must be a positive integer")
    if op == "days_since" and not raw.get("of"):
        problems.append(f"{name}: days_since needs `of`")
    if any(v is None for v in kinds.values()):
        return None
    return TraitSpec(
        name=name,
        op=op,
        kinds=kinds["kinds"] or frozenset(),
        fields=tuple(fields or ()),
        group_by=raw.get("group_by"),
        distinct_by=raw.get("distinct_by"),
        subtract_kinds=kinds["subtract_kinds"] or frozenset(),
        close_kinds=kinds["close_kinds"] or frozenset(),
        window_days=window if isinstance(window, int) else None,
        k=k if isinstance(k, int) else 5,
        of=raw.get("of"),
    )


# -- accumulating: one event's rows ----------------------------------------------------------


def _dig(node: Any, path: tuple[str, ...]) -> Iterator[Any]:
    if not path:
        if node is not None and node != "":
            yield node
        return
    head, rest = path[0], path[1:]
    if head.endswith("[]"):
        items = node.get(head[:-2]) if isinstance(node, dict) else None
        for item in items if isinstance(items, list) else ():
            yield from _dig(item, rest)
    elif isinstance(node, dict):
        yield from _dig(node.get(head), rest)


@cache
def _steps(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def field_values(event: dict[str, Any], path: str, ts: datetime) -> list[Any]:
    """The values a property path names in an event (`session`: the event's session key)."""
    if path == "session":
        context = event.get("context") if isinstance(event.get("context"), dict) else {}
        if isinstance(context.get("sessionId"), str | int):
            return [str(context["sessionId"])]
        device = event.get("anonymousId") or event.get("userId") or ""
        return [f"{device}@{int(ts.timestamp()) // SESSION_SLOT_S}"]
    props = event.get("properties")
    if not isinstance(props, dict):
        return []
    steps = _steps(path)
    if len(steps) == 1 and not path.endswith("[]"):  # a property of its own (most paths)
        value = props.get(path)
        if isinstance(value, str | int | float) and not isinstance(value, bool) and value != "":
            return [value]
        return []
    values = list(_dig(props, steps))
    return [v for v in values if isinstance(v, str | int | float) and not isinstance(v, bool)]


def _amount(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return Decimal(str(value)).quantize(CENT)
    except InvalidOperation:
        return None


def _first(event: dict[str, Any], path: str | None, ts: datetime) -> str:
    values = field_values(event, path, ts) if path else []
    return str(values[0]) if values else ""


class AccumulatorRows(NamedTuple):
    """The accumulator rows a batch of events adds to, as columns: each row's event (its
    position in the batch), trait, bucket, amount and latest value."""

    events: list[int]
    traits: list[str]
    buckets: list[str]
    amounts: list[Decimal | None]
    values: list[Any]


def accumulate(
    catalog: TraitCatalog,
    kinds: list[str],
    events: list[dict[str, Any]],
    stamps: list[datetime],
    unwritten: frozenset[str] = frozenset(),
) -> AccumulatorRows:
    """The (trait, bucket, amount, latest value) rows a batch of applied events adds to, but
    those of `unwritten` traits (read through another trait's rows). In: each event's kind,
    event and time, in the same order. Rows come per kind, then per event: their order
    carries no meaning."""
    by_kind: dict[str, list[int]] = {}
    for number, kind in enumerate(kinds):
        by_kind.setdefault(kind, []).append(number)
    rows = AccumulatorRows([], [], [], [], [])
    of_event, traits, buckets, amounts, values = rows
    for kind, numbers in by_kind.items():
        plan = catalog.plan_for(kind, unwritten)
        days = [stamps[i].astimezone(UTC).date().isoformat() for i in numbers] if plan.daily else []
        # Rows every event of the kind adds (bucket '' or its day): a column at a time.
        unset = [None] * len(numbers)
        for name, daily in plan.fixed:
            of_event += numbers
            traits += [name] * len(numbers)
            buckets += days if daily else [""] * len(numbers)
            amounts += unset
            values += unset
        for names, spec, side in plan.steps:
            # The step's rows for one of its traits, then repeated for each of them.
            step: list[int] = []  # each row's event
            keyed: list[str] = []  # each row's bucket
            summed: list[Decimal | None] = []
            latest: list[Any] = []
            if side in ("+", "-"):
                for number in numbers:
                    event, ts = events[number], stamps[number]
                    amount = _amount(next(iter(field_values(event, spec.fields[0], ts)), None))
                    if amount is None:
                        continue
                    group = _first(event, spec.group_by, ts)
                    step.append(number)
                    keyed.append(
                        f"+|{group}|{_first(event, spec.distinct_by, ts)}"
                        if side == "+"
                        else f"-|{group}"
                    )
                    summed.append(amount)
            elif side:  # open_count: a key opened or closed
                for number in numbers:
                    for value in field_values(events[number], spec.fields[0], stamps[number]):
                        step.append(number)
                        keyed.append(f"{side}|{value}")
            elif spec.op == "latest":
                for number in numbers:
                    found = field_values(events[number], spec.fields[0], stamps[number])
                    if found:
                        step.append(number)
                        latest.append(found[0])
                keyed = [""] * len(step)
            else:  # distinct_count, top: one row per value, per day when windowed
                for position, number in enumerate(numbers):
                    event, ts = events[number], stamps[number]
                    found = {str(v) for path in spec.fields for v in field_values(event, path, ts)}
                    step += [number] * len(found)
                    if spec.window_days:
                        day = days[position]
                        keyed += [f"{day}|{value}" for value in found]
                    else:
                        keyed += found
            unset = [None] * len(step)
            for name in names:
                of_event += step
                traits += [name] * len(step)
                buckets += keyed
                amounts += summed or unset
                values += latest or unset
    return rows


# -- rolling up: a view from its allowed rows ------------------------------------------------


class Totals(NamedTuple):
    """One trait of one view, summed by SQL over the view's allowed accumulator rows.

    n: the events counted; buckets: how many distinct buckets; first_ts / last_ts: the
    earliest and latest event time as the profile shows it, ISO text with its UTC offset
    (formatted by SQL, `ProfileBuilder`); value: the latest value (JSON). keys, counts,
    amounts:
    per bucket (sum, mean, top, open_count), or per UTC day after the view's window
    horizon (windowed traits; a count sums events, a distinct count counts buckets), in
    no particular order. Columns a trait's op does not read are None (`rolled_columns`).
    """

    n: int | None
    buckets: int | None
    first_ts: str | None
    last_ts: str | None
    value: str | None
    keys: list[str] | None
    counts: list[int] | None
    amounts: list[Decimal] | None


def rolled_columns(
    catalog: TraitCatalog, read_through: dict[str, str] | None = None
) -> dict[str, Any]:
    """The SQL parameters of a roll-up: which traits each optional Totals column is read
    for (a trait read through another's rows: that one's), which traits keep daily buckets
    and the longest window (`ProfileBuilder`)."""
    through = read_through or {}

    def read_for(keep: Callable[[TraitSpec], bool]) -> list[str]:
        """The traits whose rows are read for the traits `keep` picks."""
        return sorted({through.get(s.name, s.name) for s in catalog.computed if keep(s)})

    def named(*ops: str) -> list[str]:
        return read_for(lambda spec: spec.op in ops)

    return {
        "amounts": named("sum", "mean"),
        "firsts": named("first_time"),
        "lasts": named("last_time"),
        "values": named("latest"),
        "keyed": named("sum", "mean", "top", "open_count"),
        "windowed": read_for(lambda spec: bool(spec.window_days)),
        "day_sums": read_for(lambda spec: bool(spec.window_days) and spec.op == "count"),
        "max_window": catalog.max_window,
    }


def _money(value: Decimal) -> float:
    return float(value.quantize(CENT))


def _read_count(row: Totals | None) -> Any:
    return row.n if row else 0


def _read_distinct(row: Totals | None) -> Any:
    return row.buckets if row else 0


def _read_first(row: Totals | None) -> Any:
    return row.first_ts if row else None


def _read_last(row: Totals | None) -> Any:
    return row.last_ts if row else None


def _read_latest(row: Totals | None) -> Any:
    return orjson.loads(row.value) if row and row.value else None


def _read_open(row: Totals | None) -> Any:
    keys = (row.keys or []) if row else []
    opened = {k[5:] for k in keys if k.startswith("open|")}
    closed = {k[6:] for k in keys if k.startswith("close|")}
    return len(opened - closed)


def _first_of(bucket: tuple[str, int, Decimal]) -> str:
    return bucket[0]


# The readers that need nothing of the spec but its op.
_PLAIN_READERS: dict[str, Callable[[Totals | None], Any]] = {
    "count": _read_count,
    "distinct_count": _read_distinct,
    "first_time": _read_first,
    "last_time": _read_last,
    "latest": _read_latest,
    "open_count": _read_open,
}


class _Buckets:
    """One trait's amount buckets as (sign, group, events, amount), in bucket order, parsed
    once per Totals: a sum and a mean read through the same trait's rows share the parse
    (the sort and the splits were most of their cost). Keeps the last Totals parsed."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: tuple[Totals | None, list[tuple[str, str, int, Decimal]]] = (None, [])

    def of(self, row: Totals) -> list[tuple[str, str, int, Decimal]]:
        seen, parsed = self.last  # one read: a pair set at once
        if seen is not row:
            buckets = zip(row.keys or [], row.counts or [], row.amounts or [], strict=True)
            parsed = []
            for bucket, n, amount in sorted(buckets, key=_first_of):
                sign, group = bucket.split("|", 2)[:2]
                parsed.append((sign, group, n, amount))
            self.last = (row, parsed)
        return parsed


def _reader(spec: TraitSpec, buckets: _Buckets | None = None) -> Callable[[Totals | None], Any]:
    """How one non-windowed trait's value follows from its Totals (`rollup`); `buckets`:
    the parse of its source's amount buckets, shared by the sums and means reading it."""
    plain = _PLAIN_READERS.get(spec.op)
    if plain is not None:
        return plain
    if spec.op in ("sum", "mean"):
        parse = (buckets or _Buckets()).of

        def summed(row: Totals | None) -> Any:
            return _sum_or_mean(spec, parse(row) if row else [])

        return summed
    k = spec.k  # top

    def ranked(row: Totals | None) -> Any:
        if not row:
            return []
        # (-events, bucket) pairs: ordered by tuples, without a key function per bucket.
        counted = sorted(zip(map(neg, row.counts or []), row.keys or [], strict=True))
        return [bucket for _, bucket in counted[:k]]

    return ranked


class RollupPlan(NamedTuple):
    """A catalog's roll-up worked out once (`rollup`): (name, source, reader) of each
    non-windowed computed trait, and (name, source) of each windowed one, in catalog order."""

    computed: tuple[tuple[str, str, Callable[[Totals | None], Any]], ...]
    windowed: tuple[tuple[str, str], ...]


def rollup_plan(catalog: TraitCatalog, read_through: dict[str, str] | None = None) -> RollupPlan:
    """A catalog's roll-up, worked out once for many views (`rollup`). In: the traits read
    through another's Totals (default: the window twins)."""
    if read_through is None:
        read_through = catalog.window_twins
    computed, windowed = [], []
    parses: dict[str, _Buckets] = {}
    for spec in catalog.computed:
        source = read_through.get(spec.name, spec.name)
        if spec.window_days:
            windowed.append((spec.name, source))
        elif spec.op != "days_since":
            computed.append(
                (spec.name, source, _reader(spec, parses.setdefault(source, _Buckets())))
            )
    return RollupPlan(tuple(computed), tuple(windowed))


def rollup(
    catalog: TraitCatalog, totals: dict[str, Totals], plan: RollupPlan | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The computed traits of one view, and the daily buckets its windowed traits read.

    In: the view's Totals per trait name, and the catalog's `rollup_plan` (default: the
    window twins read through the trait they twin). Out: (computed, windows); windowed
    traits and `days_since` are left to `at_read`. Days no later than the longest window
    before the view's last event are already dropped: no read at or after it needs them.
    """
    if plan is None:
        plan = catalog.default_rollup
    computed = {name: read(totals.get(source)) for name, source, read in plan.computed}
    windows: dict[str, dict[str, int]] = {}
    days: dict[str, dict[str, int]] = {}  # window twins share one read of their days
    for name, source in plan.windowed:
        if source not in days:
            row = totals.get(source)
            days[source] = (
                dict(sorted(zip(row.keys or [], row.counts or [], strict=True))) if row else {}
            )
        windows[name] = days[source]
    return computed, windows


def _sum_or_mean(
    spec: TraitSpec, rows: Iterable[tuple[str, str, int, Decimal]]
) -> dict[str, float]:
    """Per group: each distinct key once (at the mean of its repeats), minus subtractions.

    In: (sign, group, events, amount) per bucket, in bucket order (`_Buckets`)."""
    totals: dict[str, Decimal] = {}
    counts: dict[str, int] = {}
    distinct = bool(spec.distinct_by)
    subtracts = spec.op == "sum"  # a mean read through a sum's rows leaves its subtractions
    zero = Decimal(0)
    for sign, group, n, amount in rows:
        if sign == "+":
            totals[group] = totals.get(group, zero) + (amount / n if distinct else amount)
            counts[group] = counts.get(group, 0) + 1
        elif subtracts:
            totals[group] = totals.get(group, zero) - amount
    if spec.op == "mean":
        return {g: _money(totals[g] / counts[g]) for g in sorted(counts)}
    return {g: _money(totals[g]) for g in sorted(totals)}


def _read_plan(catalog: TraitCatalog, today: date) -> tuple[tuple[str, str, str | None], ...]:
    """What `at_read` works out at `today`, once per day rather than per view: (name, first
    day, last day) of each window, (name, the time trait, None) of each `days_since`, in
    catalog order."""
    plan = catalog._reads.get(today)
    if plan is None:
        end = today.isoformat()
        plan = tuple(
            (spec.name, (today - timedelta(days=spec.window_days - 1)).isoformat(), end)
            if spec.window_days
            else (spec.name, spec.of or "", None)
            for spec in catalog.computed
            if spec.window_days or spec.op == "days_since"
        )
        catalog._reads.clear()  # one day's plan at a time
        catalog._reads[today] = plan
    return plan


def at_read(
    catalog: TraitCatalog,
    computed: dict[str, Any],
    windows: dict[str, Any],
    now: datetime,
    names: frozenset[str] | None = None,
) -> dict[str, Any]:
    """The computed traits as of `now`: windows summed over their days, `days_since` counted.

    A window of N days at time T holds the UTC days T-N+1 .. T (event time buckets).
    `names`: only these traits are read (a segment's conditions name few of them).
    """
    today = now.astimezone(UTC).date()
    plan = _read_plan(catalog, today)
    if names is None:
        out = dict(computed)
    else:
        out = {name: computed[name] for name in names if name in computed}
        plan = tuple(entry for entry in plan if entry[0] in names)
    for name, start, end in plan:
        if end is not None:
            days = windows.get(name) or {}
            out[name] = sum(n for day, n in days.items() if start <= day <= end)
        else:
            stamp = computed.get(start)
            out[name] = (
                (today - datetime.fromisoformat(stamp).astimezone(UTC).date()).days
                if stamp
                else None
            )
    return out


def merge_identify_trait(
    strategy: str, values: list[tuple[datetime | str, str, Any]], ordered: bool = False
) -> Any:
    """One identify trait's value from its events' (ts, event key, value), by strategy;
    `ordered` says they already come in (ts, event key) order, and then the times are not
    read (the builder passes its rows' ISO text)."""
    if not ordered:
        values = sorted(values, key=lambda v: (v[0], v[1]))
    if strategy == "first":
        return values[0][2]
    if strategy == "max":
        numbers = [v[2] for v in values if _number(v[2])]
        return max(numbers) if numbers else max(values, key=lambda v: str(v[2]))[2]
    if strategy == "sum":
        numbers = [v[2] for v in values if _number(v[2])]
        return sum(numbers) if numbers else values[-1][2]
    if strategy == "union":
        seen: dict[bytes, Any] = {}
        for _, _, value in values:
            for item in value if isinstance(value, list) else [value]:
                seen.setdefault(orjson.dumps(item, option=orjson.OPT_SORT_KEYS), item)
        return [seen[k] for k in sorted(seen)]
    return values[-1][2]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def day_of(value: date | datetime) -> str:
    return value.isoformat()[:10]
