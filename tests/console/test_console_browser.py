"""The console in a real headless Chromium against a running stack: search a person, open
the identity graph, reject a link, see the split. Screenshots land in
.tessera/artifacts/console/ for a person to look at."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

pytestmark = pytest.mark.broker

CHROMIUM = Path("/usr/bin/chromium")
# Without these, Chromium on a closed network waits on services it cannot reach.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parents[2] / ".tessera" / "artifacts" / "console"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "chromium is missing: run `make browser-setup`"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def open_console(browser: Browser, scenario, key: str) -> Page:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(f"{scenario.stack.api_url}/console/")
    page.fill("#api-key", scenario.keys[key])
    page.click("#key-form button[type=submit]")
    expect(page.locator("#whoami")).to_contain_text(f"({'reader' if key == 'web' else key})")
    return page


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    assert (ARTIFACTS / f"{name}.png").stat().st_size > 0


def test_overview_shows_live_counters_and_lag(browser, scenario):
    page = open_console(browser, scenario, "admin")
    total = page.locator("#counters tr.total")
    expect(total).to_contain_text("all sources")
    received = int(scenario.get("/v1/stats").json()["received"])
    expect(page.locator("#counters")).to_have_attribute("data-received", str(received))
    expect(page.locator("#lag")).to_contain_text("tessera.events.behavioral")
    expect(page.locator("#reasons")).to_contain_text("malformed_json")
    # The sparkline draws once two polls have given a rate.
    expect(page.locator("#rate")).to_contain_text("events/s")
    expect(page.locator("#sparkline polyline")).to_have_count(1)
    shot(page, "overview")
    page.close()


def test_search_a_person_open_the_graph_reject_a_link_and_see_the_split(browser, scenario):
    page = open_console(browser, scenario, "admin")
    page.click("#tabs button[data-panel=profiles]")
    page.select_option("#lookup-type", "email")
    page.fill("#lookup-value", "cy@example.org")  # any identifier, as the source wrote it
    page.select_option("#lookup-purpose", "personalization")
    page.click("#lookup-form button[type=submit]")
    expect(page.locator("#profile-person")).to_have_text(scenario.person_id)
    expect(page.locator("#profile-traits")).to_contain_text("first_name")
    expect(page.locator("#profile-traits")).to_contain_text("console-2")  # the trait's source event
    expect(page.locator("#profile-consent")).to_contain_text("personalization")
    shot(page, "profile")

    page.click("#open-graph")
    graph = page.locator("#graph")
    expect(graph).to_have_attribute("data-records", "3")
    expect(graph).to_have_attribute("data-links", "2")
    expect(graph.locator(".edge text").first).to_contain_text("shared:")
    shot(page, "graph-before")

    before = scenario.get(f"/v1/identity/{scenario.person_id}/explain").json()
    # The link that joined the device's page view to the login: rejecting it splits the device off.
    link = next(link for link in before["links"] if link["rule"] == "shared:anonymous_id")
    page.locator(f'#graph .edge[data-link="{link["link_id"]}"] line.hit').click(force=True)
    expect(page.locator("#link-detail")).to_contain_text(link["record_l"])
    page.fill("#reject-reason", "shared family tablet: not the same person")
    page.click("#reject-submit")
    expect(page.locator("#reject-status")).to_contain_text("split", timeout=90_000)
    expect(page.locator("#history")).to_contain_text("split")
    after = scenario.get(f"/v1/identity/{scenario.person_id}/explain").json()
    moved = set(before["records"]) - set(after["records"])
    assert moved and len(after["records"]) + len(moved) == 3
    expect(graph).to_have_attribute("data-records", str(len(after["records"])))
    expect(graph).to_have_attribute("data-links", str(len(after["links"])))
    shot(page, "graph-after-split")

    # The records split off are a person of their own now, and the graph opens on them.
    page.click("#split-person")
    expect(page.locator("#graph-title")).not_to_contain_text(scenario.person_id)
    expect(graph).to_have_attribute("data-records", str(len(moved)))
    for record in moved:
        expect(graph.locator(f'.node[data-record="{record}"]')).to_have_count(1)
    shot(page, "graph-split-off-person")
    page.close()


def test_an_auditor_sees_the_graph_but_no_profile_and_no_dead_letters(browser, scenario):
    # The person of the login holds a link whether or not the split test ran first.
    person = scenario.get(
        "/v1/profiles/lookup", type="user_id", value="u-console", purpose="personalization"
    ).json()["person_id"]
    page = open_console(browser, scenario, "auditor")
    page.click("#tabs button[data-panel=identity]")
    page.fill("#graph-person", person)
    page.click("#graph-form button[type=submit]")
    expect(page.locator("#graph .node").first).to_be_visible()
    page.locator("#graph .edge line.hit").first.click(force=True)
    expect(page.locator("#reject-form")).to_be_hidden()  # rejecting a link is an admin's call

    page.click("#tabs button[data-panel=profiles]")
    expect(page.locator("#lookup-purpose option")).to_have_count(0)  # auditors read no purpose
    page.fill("#lookup-value", "u-console")
    page.click("#lookup-form button[type=submit]")
    expect(page.locator("#profile-error")).to_contain_text("403")
    expect(page.locator("#profile")).to_be_hidden()

    page.click("#tabs button[data-panel=dlq]")
    page.click("#dlq-form button[type=submit]")
    expect(page.locator("#dlq-error")).to_contain_text("admin")
    shot(page, "auditor")
    page.close()


def test_dead_letter_browser_shows_reasons_and_the_payload_as_text(browser, scenario):
    page = open_console(browser, scenario, "admin")
    page.click("#tabs button[data-panel=dlq]")
    page.fill("#dlq-reason", "malformed_json")
    page.click("#dlq-form button[type=submit]")
    row = page.locator("#dlq-table tr", has_text="malformed_json").first
    expect(row).to_be_visible()
    row.locator("a").click()
    payload = page.locator("#dlq-payload")
    # The payload is shown as text: the <script> it carries is not run nor parsed as HTML.
    expect(payload).to_contain_text(scenario.garbage.decode())
    assert page.locator("#dlq-payload script").count() == 0
    shot(page, "dead-letters")
    page.close()


def test_an_auditor_verifies_the_ledger_and_reads_a_subjects_timeline(browser, scenario):
    page = open_console(browser, scenario, "auditor")
    page.click("#tabs button[data-panel=audit]")
    page.click("#audit-verify")
    entries = scenario.get("/v1/audit/verify").json()["entries"]
    expect(page.locator("#audit-verify-status")).to_contain_text(f"intact: {entries} entries")

    page.fill("#audit-identifier", "email:cy@example.org")
    page.click("#audit-subject-form button[type=submit]")
    timeline = scenario.get("/v1/audit/subjects/email:cy@example.org").json()["timeline"]
    # Header row plus one row per timeline entry, each naming its event.
    expect(page.locator("#audit-timeline tr")).to_have_count(len(timeline) + 1)
    expect(page.locator("#audit-timeline")).to_contain_text("applied")
    shot(page, "audit")

    page.fill("#audit-request", "no-such-request")
    page.click("#audit-erasure-form button[type=submit]")
    expect(page.locator("#audit-error")).to_contain_text("404")
    page.close()


def test_a_reader_is_refused_the_audit_views(browser, scenario):
    page = open_console(browser, scenario, "web")
    page.click("#tabs button[data-panel=audit]")
    page.click("#audit-verify")
    expect(page.locator("#audit-error")).to_contain_text("auditor and admin")
    page.close()
