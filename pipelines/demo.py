"""`tessera demo`: the whole product on one machine, end to end, explained as it runs."""

from __future__ import annotations

import csv
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.table import Table

from consent.keys import KEY_STORE_ENV, SubjectKeyStore
from pipelines import topics
from pipelines.kafka import read_topic
from pipelines.produce import produce_events, read_lines
from pipelines.stack import LocalStack
from profiles.access import KEYS_ENV, write_keyring
from synthetic.events import write_dataset


def wait_until_processed(
    api_url: str, expected: int, timeout: float = 600, stall: float = 120
) -> dict[str, Any]:
    """Poll /v1/stats until `expected` events have an outcome and the API's replica has
    applied everything on the topics (the changelog of the last batch can arrive after its
    outcomes): seen at the end twice in a row. Raises TimeoutError on a stall."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    settled = 0
    while True:
        stats = httpx.get(f"{api_url}/v1/stats", timeout=10).json()
        if stats["received"] >= expected:
            settled = settled + 1 if stats.get("replica", {}).get("at_end", True) else 0
            if settled >= 2:
                return stats
        now = time.monotonic()
        if stats["received"] != last:
            last, last_change = stats["received"], now
        if now > deadline or now - last_change > stall:
            raise TimeoutError(f"{stats['received']:,} of {expected:,} events processed; stalled")
        time.sleep(0.25)


def _example_user_ids(events_file: Path, count: int) -> list[str]:
    """Registered persons with the most orders: the profiles worth showing."""
    orders: Counter = Counter()
    for raw in read_lines(events_file):
        if b'"Order Completed"' not in raw:
            continue
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("userId"), str):
            orders[doc["userId"]] += 1
    return [user for user, _ in orders.most_common(count)]


def _profile_table(profile: dict[str, Any]) -> Table:
    computed = profile["computed"]
    traits = profile["traits"]
    name = (
        " ".join(str(traits[t]["value"]) for t in ("first_name", "last_name") if t in traits)
        or "(no name)"
    )
    table = Table(title=f"{profile['person_id']}  {name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for id_type, values in profile["identifiers"].items():
        shown = ", ".join(values[:3]) + (f" (+{len(values) - 3} more)" if len(values) > 3 else "")
        table.add_row(id_type, shown)
    ltv = ", ".join(f"{v:,.2f} {c}" for c, v in computed["lifetime_value"].items()) or "-"
    table.add_row("orders", f"{computed['order_count']} ({computed['refund_count']} refunds)")
    table.add_row("lifetime value", ltv)
    table.add_row("open tickets", str(computed["open_tickets"]))
    table.add_row("last CSAT", str(computed["last_csat"] or "-"))
    table.add_row(
        "events",
        f"{computed['event_count']} (first {computed['first_seen'][:10]}, "
        f"last {computed['last_seen'][:10]})",
    )
    if profile.get("merged_from"):
        table.add_row("merged from", ", ".join(profile["merged_from"]))
    return table


def run_demo(
    console: Console,
    data_dir: Path,
    persons: int,
    events: int,
    seed: int,
    keep_running: bool,
    wait: Callable[[], None],
) -> None:
    """Generate, stream, wait, and print a readable account of every stage's outcome."""
    if data_dir.exists():
        shutil.rmtree(data_dir)  # a demo starts from nothing, like a fresh machine
    data_dir.mkdir(parents=True)
    events_file, truth_file = data_dir / "events.jsonl", data_dir / "truth.csv"
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)

    console.rule("[bold]Tessera demo")
    model_file = data_dir / "identity-model.json"
    with console.status("training the identity model (Splink, EM) on last month's events"):
        trained = _train_identity_model(
            data_dir / "history.jsonl", model_file, persons, events, seed, end
        )
    console.print(
        f"identity model: trained without labels on {trained.records:,} distinct identity "
        f"records of a previous month in {trained.seconds:.1f} s ({model_file})"
    )
    with console.status(f"generating {events:,} events for {persons:,} persons"):
        write_dataset(events_file, truth_file, persons=persons, events=events, seed=seed, end=end)
    # The local stack's API keys: hashes in the file, secrets printed once below.
    keys_file = data_dir / "api-keys.yaml"
    keys = write_keyring(
        keys_file,
        [
            {"name": "admin", "role": "admin"},
            {"name": "auditor", "role": "auditor"},
            {"name": "web", "role": "reader", "purposes": ["personalization"]},
        ],
    )
    os.environ[KEYS_ENV] = str(keys_file)
    # Per-subject keys shared by the producer, the worker and the API (they inherit the
    # variable): what reaches the topics is sealed, so an erasure can shred it there too.
    os.environ[KEY_STORE_ENV] = str(data_dir / "subject-keys.sqlite")
    headers = {"X-API-Key": keys["admin"]}
    with console.status("starting the embedded broker, the worker and the profile API"):
        stack = LocalStack(
            data_dir / "stack", worker_options={"identity_model": str(model_file)}
        ).__enter__()
    try:
        console.print(f"broker [bold]{stack.bootstrap}[/]   API [bold]{stack.api_url}[/]")
        console.print(
            f"API keys (X-API-Key; hashes in {keys_file}): admin [bold]{keys['admin']}[/]  "
            f"auditor {keys['auditor']}  personalization reader {keys['web']}"
        )
        truth = list(csv.DictReader(truth_file.open()))
        expected = Counter(row["expected_outcome"] for row in truth)
        started = time.monotonic()
        with console.status("producing to Kafka"):
            per_topic = produce_events(
                read_lines(events_file),
                stack.bootstrap,
                keys=SubjectKeyStore(os.environ[KEY_STORE_ENV]),
            )
        produced_s = time.monotonic() - started
        with console.status("waiting for every event to reach an outcome"):
            stats = wait_until_processed(stack.api_url, len(truth) - expected["duplicate"])
        elapsed = time.monotonic() - started
        true_persons = len({row["person"] for row in truth if row["person"]})
        _print_summary(
            console, stats, expected, per_topic, len(truth), produced_s, elapsed, true_persons
        )
        _print_quality(console, stack.api_url)
        shown = _example_user_ids(events_file, 3)
        _print_profiles(console, stack.api_url, shown, headers)
        _print_explanation(console, stack.api_url, shown[0] if shown else None, headers)
        if len(shown) > 1:
            _print_compliance(console, stack, shown[-1], headers, {"X-API-Key": keys["auditor"]})
        console.print(f"\nfiles: {events_file}  {truth_file}  logs: {data_dir / 'stack' / 'logs'}")
        if keep_running:
            console.print(f"\nThe stack is up. Broker {stack.bootstrap}")
            console.print(f"  {stack.api_url}/v1/stats")
            console.print(f"  {stack.api_url}/v1/quality")
            console.print(
                f"  {stack.api_url}/v1/profiles/lookup?type=email&value=...&purpose=personalization"
            )
            console.print(f"  {stack.api_url}/docs  (OpenAPI)")
            console.print(f"  {stack.api_url}/console/  (the console: type an API key above)")
            console.print(f"  {stack.api_url}/metrics  {stack.worker_metrics_url}  (Prometheus)")
            console.print("Ctrl-C to stop.")
            wait()
    finally:
        with console.status("shutting down"):
            stack.stop()


def _print_summary(
    console: Console,
    stats: dict[str, Any],
    expected: Counter,
    per_topic: Counter,
    lines: int,
    produced_s: float,
    elapsed: float,
    true_persons: int,
) -> None:
    table = Table(title="Every event, accounted for", title_justify="left")
    table.add_column("outcome")
    table.add_column("pipeline", justify="right")
    table.add_column("ground truth", justify="right")
    table.add_column("")
    for outcome in ("applied", "rejected", "withheld"):
        ok = stats[outcome] == expected[outcome]
        table.add_row(
            outcome,
            f"{stats[outcome]:,}",
            f"{expected[outcome]:,}",
            "[green]match[/]" if ok else "[red]differs[/]",
        )
    table.add_row("duplicates (re-sent, counted once)", "", f"{expected['duplicate']:,}", "")
    table.add_row("[bold]events produced", f"{lines:,}", "", "")
    console.print(table)
    topics = Table(title="Input topics", title_justify="left")
    topics.add_column("topic")
    topics.add_column("events", justify="right")
    for topic, count in sorted(per_topic.items()):
        topics.add_row(topic, f"{count:,}")
    console.print(topics)
    reasons = Table(title="Rejected (dead-letter topic), by reason", title_justify="left")
    reasons.add_column("reason code")
    reasons.add_column("events", justify="right")
    for reason, count in stats["rejected_by_reason"].items():
        reasons.add_row(reason, f"{count:,}")
    console.print(reasons)
    withheld = ", ".join(f"{p}: {n:,}" for p, n in stats["withheld_by_purpose"].items()) or "none"
    console.print(f"[bold]Withheld by consent[/] (no consent for the purpose): {withheld}")
    console.print(
        f"[bold]Identity[/]: {stats['persons']:,} unified profiles, {stats['merges']:,} merges, "
        f"{stats['identity_conflicts']:,} conflicts kept apart; the ground truth has "
        f"{true_persons:,} real persons"
    )
    rules = ", ".join(f"{r}: {n:,}" for r, n in stats["identity_links_by_rule"].items()) or "none"
    console.print(
        f"[bold]Identity links by rule[/] (splink = probabilistic, Splink model): {rules}"
    )
    rate = stats["received"] / elapsed if elapsed else 0
    console.print(
        f"[bold]Time[/]: produced in {produced_s:.1f} s; all {stats['received']:,} outcomes "
        f"recorded {elapsed:.1f} s after the first event was sent ({rate:,.0f} events/s end to end)"
    )


@dataclass(frozen=True)
class _Trained:
    records: int
    seconds: float


def _train_identity_model(
    history: Path, model_file: Path, persons: int, events: int, seed: int, end: datetime
) -> _Trained:
    """Train on a previous month's stream (another seed), as an operator would before go-live."""
    from identity.model import records_table, save_model, train_model
    from identity.records import record_id_of
    from identity.sources import read_records

    write_dataset(history, None, persons=persons, events=events, seed=seed + 1, end=end)
    distinct = {record_id_of(fields): fields for _, fields in read_records(history)}
    started = time.monotonic()
    model, report = train_model(records_table({"record_id": r, **f} for r, f in distinct.items()))
    save_model(model, model_file)
    return _Trained(report.records, time.monotonic() - started)


def _print_explanation(
    console: Console, api_url: str, user_id: str | None, headers: dict[str, str]
) -> None:
    if user_id is None:
        return
    profile = httpx.get(
        f"{api_url}/v1/profiles/lookup",
        params={"type": "user_id", "value": user_id, "purpose": "subject_access"},
        headers=headers,
        timeout=10,
    ).json()
    body = httpx.get(
        f"{api_url}/v1/identity/{profile['person_id']}/explain", headers=headers, timeout=10
    ).json()
    console.rule(f"Why {profile['person_id']} is one person (GET /v1/identity/…/explain)")
    table = Table(show_header=True)
    for name in ("link", "rule", "match weight", "strongest evidence"):
        table.add_column(name)
    for link in body["links"][:8]:
        comparisons = sorted(
            (link.get("comparisons") or {}).items(), key=lambda kv: -abs(kv[1]["match_weight"])
        )[:3]
        table.add_row(
            f"{link['record_l'][:10]}… ~ {link['record_r'][:10]}…",
            link["rule"],
            f"{link['match_weight']:+.1f}" if link.get("match_weight") is not None else "",
            ", ".join(f"{k} {v['match_weight']:+.1f}" for k, v in comparisons),
        )
    console.print(table)
    console.print(
        f"{len(body['records'])} identity records, {len(body['links'])} links, "
        f"{sum(1 for h in body['history'] if h['kind'] == 'merge')} merges in its history"
    )


def _poll(
    fetch: Callable[[], httpx.Response], status: int = 200, timeout: float = 120
) -> httpx.Response:
    """`fetch` until it answers `status` (or the timeout passes): the last answer."""
    deadline = time.monotonic() + timeout
    while (response := fetch()).status_code != status and time.monotonic() < deadline:
        time.sleep(0.3)
    return response


def _print_compliance(
    console: Console,
    stack: LocalStack,
    user_id: str,
    admin: dict[str, str],
    auditor: dict[str, str],
) -> None:
    """What an auditor asks: is the ledger intact, what happened to this subject, and the
    proof that an erasure left nothing readable behind."""
    api = stack.api_url
    console.rule("Compliance: the lineage ledger, a subject's timeline, an erasure")
    verify = httpx.get(f"{api}/v1/audit/verify", headers=auditor, timeout=60).json()
    chain = "intact" if verify["ok"] else f"BROKEN at entry {verify['first_broken_seq']}"
    console.print(
        f"ledger (GET /v1/audit/verify): {verify['entries']:,} hash-chained entries, chain {chain}"
    )
    timeline = httpx.get(
        f"{api}/v1/audit/subjects/user_id:{user_id}", headers=auditor, timeout=30
    ).json()
    counts = ", ".join(f"{kind} {n}" for kind, n in timeline.get("counts", {}).items())
    console.print(f"user {user_id}'s timeline (GET /v1/audit/subjects/…): {counts}")

    answer = httpx.post(
        f"{api}/v1/privacy/erasures",
        json={"type": "user_id", "value": user_id, "requested_by": "demo"},
        headers=admin,
        timeout=30,
    ).json()
    certificate = _poll(
        lambda: httpx.get(
            f"{api}/v1/privacy/erasures/{answer['request_id']}", headers=auditor, timeout=10
        )
    )
    if certificate.status_code != 200:
        console.print(f"erasure {answer['request_id']}: no certificate yet ({certificate.text})")
        return
    cert = certificate.json()
    table = Table(title=f"Erasure certificate {cert['request_id']} (no PII in it)")
    table.add_column("where")
    table.add_column("erased", justify="right")
    for where, counts in cert["erased"].items():
        for name, count in counts.items():
            if count:
                table.add_row(f"{where}: {name}", f"{count:,}")
    console.print(table)
    ledger = cert.get("ledger") or {}
    console.print(
        f"persons erased {cert['persons_erased']}, split off {cert['persons_split_off']}; "
        f"ledger entry {ledger.get('seq')} ({str(ledger.get('hash'))[:16]}…)"
    )
    gone = _poll(
        lambda: httpx.get(
            f"{api}/v1/profiles/lookup",
            params={"type": "user_id", "value": user_id, "purpose": "subject_access"},
            headers=admin,
            timeout=10,
        ),
        status=404,
        timeout=30,
    )
    needle = user_id.encode()
    found = {
        topic: sum(
            needle in b"".join([key or b"", value or b"", *(v for _, v in headers)])
            for _, _, key, value, headers in read_topic(stack.bootstrap, topic, timeout=10)
        )
        for topic in (spec.name for spec in topics.topic_specs())
    }
    plaintext = {topic: n for topic, n in found.items() if n}
    console.print(
        f"lookup by user_id now: HTTP {gone.status_code}; a scan of all {len(found)} topics "
        f"finds the user id in plaintext "
        + (f"in {plaintext}" if plaintext else "nowhere (sealed copies are unreadable)")
    )


def _print_quality(console: Console, api_url: str) -> None:
    """The quality suites' view: batches and rows checked, alerts raised (GET /v1/quality)."""
    quality = httpx.get(f"{api_url}/v1/quality", timeout=10).json()
    rows = ", ".join(f"{s}: {n:,}" for s, n in quality["rows_checked_by_source"].items())
    alerts = ", ".join(f"{c}: {n:,}" for c, n in quality["alerts_by_check"].items()) or "none"
    console.print(
        f"[bold]Quality suites[/] (great-expectations, once per micro-batch): "
        f"{quality['batches_checked']:,} batches, rows checked {rows or 'none'}; "
        f"{quality['gx_seconds']:.1f} s in GX; batch alerts: {alerts}"
    )


def _print_profiles(
    console: Console, api_url: str, user_ids: list[str], headers: dict[str, str]
) -> None:
    console.rule("Example profiles, fetched over HTTP by user id, read for personalization")
    for user_id in user_ids:
        response = httpx.get(
            f"{api_url}/v1/profiles/lookup",
            params={"type": "user_id", "value": user_id, "purpose": "personalization"},
            headers=headers,
            timeout=10,
        )
        if response.status_code == 200:
            console.print(_profile_table(response.json()))
        else:
            console.print(f"user {user_id}: HTTP {response.status_code} {response.text[:200]}")
