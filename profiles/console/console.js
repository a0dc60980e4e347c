// Tessera console: plain JavaScript over the /v1 API, with the key typed in the header.
// Every value from the server is written with textContent, never as HTML: dead letters
// and traits are untrusted input.
"use strict";

const state = { key: sessionStorage.getItem("tessera.key") || "", me: null, samples: [], graph: null, link: null };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fillTable(table, headers, rows) {
  table.replaceChildren(el("tr", {}, ...headers.map((h) => el("th", {}, h))));
  for (const row of rows) table.append(el("tr", {}, ...row.map((cell) => el("td", {}, cell))));
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.key) headers["X-API-Key"] = state.key;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body !== undefined ? JSON.stringify(options.body) : undefined,
  });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const detail = body && (body.detail || body.error) ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : response.statusText;
    const error = new Error(`${response.status}: ${detail}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// -- key and role --------------------------------------------------------------------------

async function useKey(key) {
  state.key = key;
  sessionStorage.setItem("tessera.key", key);
  try {
    state.me = await api("/v1/whoami");
    $("whoami").textContent = `${state.me.name} (${state.me.role})`;
    $("whoami").className = "ok";
  } catch (error) {
    state.me = null;
    $("whoami").textContent = error.message;
    $("whoami").className = "error";
  }
  document.body.dataset.role = state.me ? state.me.role : "none";
  fillSelect($("lookup-type"), state.me ? state.me.identifier_types : []);
  fillSelect($("lookup-purpose"), state.me ? state.me.readable_purposes : []);
}

function fillSelect(select, values) {
  select.replaceChildren(...values.map((v) => el("option", { value: v }, v)));
}

// -- panels --------------------------------------------------------------------------------

function show(panel) {
  for (const button of document.querySelectorAll("#tabs button")) button.classList.toggle("active", button.dataset.panel === panel);
  for (const section of document.querySelectorAll(".panel")) section.classList.toggle("active", section.id === panel);
  location.hash = panel;
}

// -- overview ------------------------------------------------------------------------------

async function refreshOverview() {
  try {
    const [stats, lag, quality] = await Promise.all([api("/v1/stats"), api("/v1/lag"), api("/v1/quality?bucket=minute")]);
    const rows = Object.entries(stats.by_source_topic).map(([topic, c]) => [topic, c.applied + c.rejected + c.withheld, c.applied, c.rejected, c.withheld]);
    rows.push(["all sources", stats.received, stats.applied, stats.rejected, stats.withheld]);
    fillTable($("counters"), ["source", "received", "applied", "rejected", "withheld"], rows);
    $("counters").lastChild.classList.add("total");
    $("counters").dataset.received = stats.received;
    fillTable($("lag"), ["reader", "topic", "partition", "position", "end", "lag"],
      lag.partitions.map((p) => [p.reader, p.topic, p.partition, p.position ?? "–", p.end, p.lag]));
    if (lag.error) $("lag").append(el("caption", { class: "error" }, lag.error));
    fillTable($("reasons"), ["reason", "count"], Object.entries(stats.rejected_by_reason));
    $("alerts").replaceChildren(...(quality.recent_alerts.length
      ? quality.recent_alerts.slice(0, 20).map((a) => el("li", {}, `${a.at} ${a.suite}/${a.column}: ${a.expectation} met by ${(100 * a.observed).toFixed(1)}% of ${a.rows} rows (threshold ${(100 * a.threshold).toFixed(0)}%)`))
      : [el("li", { class: "muted" }, "no alerts")]));
    sample(stats.received);
  } catch (error) {
    $("rate").textContent = error.message;
  }
}

function sample(received) {
  const now = Date.now() / 1000;
  state.samples.push([now, received]);
  state.samples = state.samples.filter(([t]) => now - t <= 300);
  const rates = [];
  for (let i = 1; i < state.samples.length; i++) {
    const [t0, c0] = state.samples[i - 1];
    const [t1, c1] = state.samples[i];
    rates.push([t1, Math.max(0, (c1 - c0) / Math.max(t1 - t0, 0.001))]);
  }
  const spark = $("sparkline");
  spark.replaceChildren();
  if (!rates.length) return;
  const width = +spark.getAttribute("width"), height = +spark.getAttribute("height");
  const top = Math.max(1, ...rates.map(([, r]) => r));
  const points = rates.map(([t, r]) => `${(width * (1 - (now - t) / 300)).toFixed(1)},${(height - 2 - (height - 4) * r / top).toFixed(1)}`);
  spark.append(svg("polyline", { points: points.join(" "), class: "spark" }));
  $("rate").textContent = `${rates[rates.length - 1][1].toFixed(1)} events/s`;
}

// -- profile explorer ----------------------------------------------------------------------

async function lookup(event) {
  event.preventDefault();
  $("profile-error").textContent = "";
  const params = new URLSearchParams({ type: $("lookup-type").value, value: $("lookup-value").value, purpose: $("lookup-purpose").value });
  try {
    const profile = await api(`/v1/profiles/lookup?${params}`);
    renderProfile(profile);
    renderConsent(profile.person_id);
  } catch (error) {
    $("profile").classList.add("hidden");
    $("profile-error").textContent = error.status === 403 ? `${error.message} (this key's role may not read profiles for that purpose)` : error.message;
  }
}

function renderProfile(profile) {
  $("profile").classList.remove("hidden");
  $("profile-person").textContent = profile.person_id;
  $("profile-person").dataset.person = profile.person_id;
  $("profile-meta").textContent = `read for ${profile.purpose}; version ${profile.version}; merged from ${(profile.merged_from || []).join(", ") || "none"}`;
  fillTable($("profile-identifiers"), ["type", "values"], Object.entries(profile.identifiers || {}).map(([t, v]) => [t, v.join(", ")]));
  fillTable($("profile-traits"), ["trait", "value", "as of", "source event"],
    Object.entries(profile.traits || {}).map(([name, t]) => [name, JSON.stringify(t.value), t.ts, t.event_key]));
  const computed = Object.entries(profile.computed || {}).map(([k, v]) => [k, typeof v === "object" && v !== null ? JSON.stringify(v) : v]);
  if (profile.segments) computed.push(["segments", (profile.segments || []).join(", ")]);
  fillTable($("profile-computed"), ["name", "value"], computed);
  $("profile-json").textContent = JSON.stringify(profile, null, 2);
}

// Consent state per purpose, as reads see it: a purpose whose read finds no view is withheld.
async function renderConsent(person) {
  const purposes = state.me ? state.me.readable_purposes : [];
  const rows = await Promise.all(purposes.map(async (purpose) => {
    try {
      await api(`/v1/profiles/${encodeURIComponent(person)}?purpose=${encodeURIComponent(purpose)}`);
      return [purpose, el("span", { class: "ok" }, "readable")];
    } catch (error) {
      return [purpose, el("span", { class: "muted" }, error.status === 404 ? "withheld (no consented events)" : error.message)];
    }
  }));
  fillTable($("profile-consent"), ["purpose", "state"], rows);
}

// -- identity graph ------------------------------------------------------------------------

async function explain(person) {
  $("graph-error").textContent = "";
  $("graph-person").value = person;
  try {
    state.graph = await api(`/v1/identity/${encodeURIComponent(person)}/explain`);
    renderGraph(state.graph);
  } catch (error) {
    $("graph-error").textContent = error.status === 403 ? `${error.message} (the graph is for auditor and admin keys)` : error.message;
  }
  return state.graph;
}

function shortId(id) { return id.length > 12 ? `${id.slice(0, 10)}…` : id; }

function renderGraph(graph) {
  const canvas = $("graph");
  canvas.replaceChildren();
  $("graph-title").textContent = `${graph.person_id}: ${graph.records.length} records, ${graph.links.length} links`;
  canvas.dataset.records = graph.records.length;
  canvas.dataset.links = graph.links.length;
  const width = +canvas.getAttribute("width"), height = +canvas.getAttribute("height");
  const radius = Math.min(width, height) / 2 - 60;
  const at = {};
  graph.records.forEach((record, i) => {
    const angle = (2 * Math.PI * i) / Math.max(graph.records.length, 1) - Math.PI / 2;
    at[record] = graph.records.length === 1 ? [width / 2, height / 2] : [width / 2 + radius * Math.cos(angle), height / 2 + radius * Math.sin(angle)];
  });
  for (const link of graph.links) {
    const [x1, y1] = at[link.record_l], [x2, y2] = at[link.record_r];
    const label = link.match_weight != null ? `${link.rule} ${link.match_weight >= 0 ? "+" : ""}${link.match_weight.toFixed(1)}` : link.rule;
    const group = svg("g", { class: "edge", "data-link": link.link_id, "data-records": `${link.record_l} ${link.record_r}` });
    group.append(svg("line", { x1, y1, x2, y2 }));
    group.append(svg("line", { x1, y1, x2, y2, class: "hit" }));
    group.append(svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, "text-anchor": "middle" }, label));
    group.addEventListener("click", () => selectLink(link));
    canvas.append(group);
  }
  for (const record of graph.records) {
    const [x, y] = at[record];
    const group = svg("g", { class: "node", "data-record": record });
    group.append(svg("circle", { cx: x, cy: y, r: 10 }));
    group.append(svg("text", { x, y: y + 24, "text-anchor": "middle" }, shortId(record)));
    group.append(svg("title", {}, record));
    canvas.append(group);
  }
  $("history").replaceChildren(...graph.history.map((h) => el("li", { class: `history-${h.kind}` },
    `${h.ts || ""} ${h.kind}${h.other_person_id ? ` ${h.person_id} ↔ ${h.other_person_id}` : ""}${h.rule ? ` (${h.rule})` : ""}`)));
  selectLink(null);
}

function selectLink(link) {
  state.link = link;
  for (const edge of document.querySelectorAll("#graph .edge")) edge.classList.toggle("selected", !!link && edge.dataset.link === link.link_id);
  if (!link) {
    $("link-detail").textContent = "none";
    $("reject-form").classList.add("hidden");
    return;
  }
  const evidence = Object.entries(link.comparisons || {}).map(([name, c]) => `${name}: ${c.level} (${c.match_weight >= 0 ? "+" : ""}${Number(c.match_weight).toFixed(2)})`);
  $("link-detail").replaceChildren(
    el("div", {}, `${link.record_l} ~ ${link.record_r}`),
    el("div", {}, `rule ${link.rule}${link.match_probability != null ? `, p=${link.match_probability}` : ""}`),
    el("div", { class: "muted" }, evidence.join("; ") || "deterministic: a shared identifier"),
  );
  $("reject-form").classList.toggle("hidden", !(state.me && state.me.may.administer));
}

async function rejectLink(event) {
  event.preventDefault();
  const link = state.link;
  if (!link) return;
  const before = state.graph;
  $("reject-status").textContent = "sending…";
  try {
    const accepted = await api("/v1/identity/links/reject", {
      method: "POST",
      body: { record_a: link.record_l, record_b: link.record_r, reason: $("reject-reason").value, operator: state.me.name },
    });
    $("reject-status").textContent = `accepted ${accepted.command_id}; waiting for the split…`;
    for (let tries = 0; tries < 60; tries++) {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      const graph = await api(`/v1/identity/${encodeURIComponent(before.person_id)}/explain`);
      if (!graph.links.some((l) => l.link_id === link.link_id)) {
        state.graph = graph;
        renderGraph(graph);
        const split = graph.history.filter((h) => h.kind === "split").pop();
        const moved = before.records.length - graph.records.length;
        $("reject-status").className = "ok";
        if (split) {
          $("reject-status").replaceChildren(`split: ${moved} record(s) moved to `,
            el("a", { href: "#identity", id: "split-person", onclick: () => explain(split.other_person_id) }, split.other_person_id));
        } else {
          $("reject-status").textContent = "link rejected; the records stay one person through other links";
        }
        return;
      }
    }
    $("reject-status").textContent = "the worker has not applied the rejection yet";
  } catch (error) {
    $("reject-status").textContent = error.message;
    $("reject-status").className = "error";
  }
}

// -- dead letters --------------------------------------------------------------------------

async function listDeadLetters(event) {
  if (event) event.preventDefault();
  $("dlq-error").textContent = "";
  const params = new URLSearchParams({ limit: "200" });
  if ($("dlq-reason").value) params.set("reason", $("dlq-reason").value);
  if ($("dlq-topic").value) params.set("topic", $("dlq-topic").value);
  try {
    const { dead_letters: letters } = await api(`/v1/dlq?${params}`);
    fillTable($("dlq-table"), ["offset", "rejected at", "source", "reasons", "payload"], letters.map((d) => [
      el("a", { href: "#dlq", onclick: () => showDeadLetter(d.offset) }, d.offset),
      d.rejected_at || "",
      `${d.source.topic}/${d.source.partition}@${d.source.offset}`,
      d.reasons.map((r) => r.code).join(", "),
      d.payload_preview.slice(0, 80),
    ]));
  } catch (error) {
    $("dlq-error").textContent = error.status === 403 ? `${error.message} (dead letters are for admin keys)` : error.message;
  }
}

async function showDeadLetter(offset) {
  const letter = await api(`/v1/dlq/${offset}`);
  $("dlq-detail").classList.remove("hidden");
  $("dlq-offset").textContent = offset;
  $("dlq-payload").textContent = `${letter.reasons.map((r) => `${r.code}: ${r.detail}`).join("\n")}\n\n${letter.payload_preview}`;
  $("dlq-fixed").value = "";
  $("dlq-status").textContent = "";
}

async function replayDeadLetter() {
  const offset = Number($("dlq-offset").textContent);
  const body = { offsets: [offset] };
  if ($("dlq-fixed").value.trim()) body.fixed = $("dlq-fixed").value.trim();
  try {
    const result = await api("/v1/dlq/replay", { method: "POST", body });
    $("dlq-status").textContent = `replayed ${result.replayed}: ${JSON.stringify(result.sent_per_topic)}`;
  } catch (error) {
    $("dlq-status").textContent = error.message;
  }
}

// -- wiring --------------------------------------------------------------------------------

// -- audit (auditor and admin keys): ledger, consent timeline, provenance, certificates ---------

function auditFailed(error) {
  $("audit-error").textContent = error.status === 403 ? `${error.message} (audits are for auditor and admin keys)` : error.message;
}

async function verifyLedger() {
  $("audit-error").textContent = "";
  try {
    const report = await api("/v1/audit/verify");
    $("audit-verify-status").textContent = report.ok
      ? `intact: ${report.entries} entries`
      : `BROKEN at entry ${report.first_broken_seq} (${report.event_key}): ${report.problem}`;
    $("audit-verify-status").className = report.ok ? "ok" : "error";
  } catch (error) { auditFailed(error); }
}

async function subjectTimeline(event) {
  event.preventDefault();
  $("audit-error").textContent = "";
  const identifier = $("audit-identifier").value.trim();
  try {
    const found = await api(`/v1/audit/subjects/${encodeURIComponent(identifier)}`);
    fillTable($("audit-consent"), ["purpose", "status", "since", "source", "policy", "jurisdiction"],
      Object.entries(found.current_consent).map(([purpose, c]) => [purpose, c.status, c.since, c.source, c.policy_version, c.jurisdiction]));
    fillTable($("audit-timeline"), ["at", "category", "kind", "purpose", "outcome", "event", "ledger seq"],
      found.timeline.map((row) => [row.at, row.category, row.kind, row.purpose, row.outcome, row.event_key, row.seq]));
  } catch (error) { auditFailed(error); }
}

async function attributeProvenance(event) {
  event.preventDefault();
  $("audit-error").textContent = "";
  const person = encodeURIComponent($("audit-person").value.trim());
  const name = encodeURIComponent($("audit-attribute").value.trim());
  try {
    const found = await api(`/v1/audit/profiles/${person}/attributes/${name}`);
    fillTable($("audit-views"), ["purpose", "in the view", "source event", "admitted as", "consent in force"],
      found.views.map((v) => [v.purpose, v.present ? "yes" : "no", v.source_event, v.admitted ? `${v.admitted.decision} (${v.admitted.basis})` : "",
        v.consent_in_force ? `${v.consent_in_force.status} since ${v.consent_in_force.since}` : "policy default"]));
    fillTable($("audit-events"), ["event", "kind", "at", "decision", "purpose", "basis", "policy"],
      found.events.map((e) => [e.event_key, e.kind, e.at, e.decision, e.purpose, e.basis, e.policy_version]));
  } catch (error) { auditFailed(error); }
}

async function erasureCertificate(event) {
  event.preventDefault();
  $("audit-error").textContent = "";
  try {
    const certificate = await api(`/v1/privacy/erasures/${encodeURIComponent($("audit-request").value.trim())}`);
    $("audit-certificate").textContent = JSON.stringify(certificate, null, 2);
  } catch (error) { auditFailed(error); }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("#tabs button")) button.addEventListener("click", () => show(button.dataset.panel));
  $("key-form").addEventListener("submit", (event) => { event.preventDefault(); useKey($("api-key").value.trim()); });
  $("lookup-form").addEventListener("submit", lookup);
  $("open-graph").addEventListener("click", () => { show("identity"); explain($("profile-person").dataset.person); });
  $("graph-form").addEventListener("submit", (event) => { event.preventDefault(); explain($("graph-person").value.trim()); });
  $("reject-form").addEventListener("submit", rejectLink);
  $("dlq-form").addEventListener("submit", listDeadLetters);
  $("dlq-replay").addEventListener("click", replayDeadLetter);
  $("audit-verify").addEventListener("click", verifyLedger);
  $("audit-subject-form").addEventListener("submit", subjectTimeline);
  $("audit-attribute-form").addEventListener("submit", attributeProvenance);
  $("audit-erasure-form").addEventListener("submit", erasureCertificate);
  if (state.key) { $("api-key").value = state.key; useKey(state.key); }
  show((location.hash || "#overview").slice(1));
  refreshOverview();
  setInterval(refreshOverview, 2000);
});
