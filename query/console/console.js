// Tally console: the rollups as charts and tables, and consumer lag, through the public API only.
// No build step and no framework: one script over the DOM, uPlot for the time series.
// State lives in the URL hash (#/explore?rollup=...), so every view can be bookmarked and shared.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "tally.console.key";
  const MAX_TABLE_ROWS = 1000;
  const SERIES_LIMIT = 10000; // the API's largest page (TALLY_MAX_LIMIT's default)
  const RATE_SAMPLES = 120;
  // Okabe–Ito: distinguishable with the common colour-vision deficiencies.
  const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"];

  // ---- Pure helpers -------------------------------------------------------------------------

  const exact = new Intl.NumberFormat(undefined, { maximumFractionDigits: 20 });
  const brief = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

  /** A measure as the API sent it, grouped, with every digit JSON kept (no rounding). */
  function formatNumber(value) {
    if (value === null || value === undefined) return "—";
    // A string argument is formatted as the exact decimal it spells (Intl.NumberFormat v3),
    // so 0.1 stays 0.1 instead of the double's 0.1000000000000000055…
    return exact.format(String(value));
  }

  function formatRate(value) {
    return value === null ? "—" : brief.format(value);
  }

  function formatSeconds(value) {
    if (value === null || value === undefined) return "—";
    return `${brief.format(value)} s`;
  }

  /** An RFC 3339 bucket from the API as "2026-12-02 05:00 UTC" (or its offset). */
  function formatBucket(text) {
    const m = /^(\d{4}-\d\d-\d\d)T(\d\d:\d\d)(?::\d\d(?:\.\d+)?)?(Z|[+-]\d\d:\d\d)$/.exec(text);
    if (!m) return text;
    return `${m[1]} ${m[2]} ${m[3] === "Z" ? "UTC" : m[3]}`;
  }

  function plural(n, one, many = `${one}s`) {
    return `${formatNumber(n)} ${n === 1 ? one : many}`;
  }

  // uPlot's time axis, in 24-hour time: [tick spacing, label, label at a new year, -, new day, -, new minute, -, mode].
  const TIME_AXIS = [
    [3600 * 24 * 365, "{YYYY}", null, null, null, null, null, null, 1],
    [3600 * 24 * 28, "{MMM}", "\n{YYYY}", null, null, null, null, null, 1],
    [3600 * 24, "{MMM} {D}", "\n{YYYY}", null, null, null, null, null, 1],
    [60, "{HH}:{mm}", "\n{YYYY}-{MM}-{DD}", null, "\n{MMM} {D}", null, null, null, 1],
    [1, "{HH}:{mm}:{ss}", "\n{YYYY}-{MM}-{DD}", null, "\n{MMM} {D}", null, null, null, 1],
  ];

  // Whole seconds and up: a sub-second tick would repeat its second's label.
  const TIME_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
    86400, 172800, 604800, 2592000, 7776000, 31536000];

  function dimensionLabel(value) {
    return value === "" ? "(none)" : String(value);
  }

  function rollupUrl(name, params) {
    const search = new URLSearchParams();
    for (const [k, v] of params) search.append(k, v);
    // Brackets and commas are legal in a query string; kept readable, the URL teaches the API.
    const query = search.toString().replace(/%5B/g, "[").replace(/%5D/g, "]").replace(/%2C/g, ",").replace(/%3A/g, ":");
    return `/v1/rollups/${encodeURIComponent(name)}?${query}`;
  }

  /** The two API calls behind a chart: the top values of the split, then their series. */
  function plan(view, measure) {
    const common = [["from", view.from], ["to", view.to], ["granularity", view.granularity]];
    if (!view.split) {
      return {
        top: null,
        series: (values) => rollupUrl(view.rollup, [
          ...common, ["fields", `bucket,${measure}`], ["order", "bucket"], ["limit", String(SERIES_LIMIT)],
        ]),
      };
    }
    return {
      top: rollupUrl(view.rollup, [
        ...common, ["fields", `${view.split},${measure}`], ["order", `-${measure}`],
        ["limit", String(view.top)], ["total", "true"],
      ]),
      series: (values) => rollupUrl(view.rollup, [
        ...common, ["fields", `bucket,${view.split},${measure}`], [`filter[${view.split}]`, values.join(",")],
        ["order", `bucket,${view.split}`], ["limit", String(SERIES_LIMIT)],
      ]),
    };
  }

  /** Rows of (bucket, [split], measure) as uPlot columns: one x per bucket, one series per value.
   *  A bucket with no row is 0 for a measure that merges by sum or is a distinct count (nothing
   *  counted), else a gap (a min, max, average or percentile of nothing). */
  function pivot(rows, split, measure, values, merge) {
    const xs = [...new Set(rows.map((r) => Date.parse(r.bucket) / 1000))].sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const keys = split ? values : [null];
    const fill = merge === "sum" || merge === "union" ? 0 : null;
    const columns = keys.map(() => xs.map(() => fill));
    const column = new Map(keys.map((k, i) => [k, i]));
    for (const r of rows) {
      const c = column.get(split ? r[split] : null);
      if (c !== undefined) columns[c][index.get(Date.parse(r.bucket) / 1000)] = r[measure];
    }
    return { xs, keys, columns };
  }

  /** Events per second between two counter scrapes, per counter, over the targets up in both.
   *  A counter lower than before was restarted: its whole value is new (as Prometheus's rate()). */
  function rates(previous, current) {
    const out = Object.fromEntries(current.names.map((n) => [n, null]));
    if (!previous) return out;
    const seconds = current.at - previous.at;
    if (seconds <= 0) return out;
    const before = new Map(previous.sources.filter((s) => s.up).map((s) => [s.name, s.counters]));
    for (const source of current.sources) {
      const old = before.get(source.name);
      if (!source.up || !old) continue;
      for (const name of current.names) {
        const now = source.counters[name] ?? 0;
        const then = old[name] ?? 0;
        out[name] = (out[name] ?? 0) + (now >= then ? now - then : now) / seconds;
      }
    }
    return out;
  }

  function totals(current) {
    const out = Object.fromEntries(current.names.map((n) => [n, 0]));
    for (const source of current.sources.filter((s) => s.up)) {
      for (const name of current.names) out[name] += source.counters[name] ?? 0;
    }
    return out;
  }

  // ---- The API ------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, problem) {
      super(problem.detail || problem.title || `HTTP ${status}`);
      this.status = status;
      this.problem = problem;
    }
  }

  let apiKey = sessionStorage.getItem(KEY_STORAGE);

  async function api(path) {
    const headers = { Accept: "application/json" };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    let response;
    try {
      response = await fetch(path, { headers, cache: "no-store" });
    } catch (err) {
      throw new ApiError(0, { title: "The query service did not answer", detail: String(err.message || err) });
    }
    const body = await response.json().catch(() => ({}));
    if (response.status === 401 || response.status === 403) askForKey(response.status, body);
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }

  function askForKey(status, problem) {
    $("key-panel").hidden = false;
    $("key-message").textContent = status === 403
      ? `This key may not read rollups: ${problem.detail || "it lacks the query scope"}.`
      : (apiKey ? `The key was refused: ${problem.detail || problem.title}.` : "This Tally requires an API key.");
    $("key-input").focus();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = $("key-input").value.trim();
    sessionStorage.setItem(KEY_STORAGE, apiKey);
    $("key-input").value = "";
    $("key-panel").hidden = true;
    $("key-change").hidden = false;
    rollups = null;
    route();
  });
  $("key-change").addEventListener("click", () => askForKey(401, { detail: "enter another key" }));
  $("key-change").hidden = !apiKey;

  // ---- DOM helpers --------------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function showError(target, err, what) {
    target.className = "status error";
    target.replaceChildren(
      el("span", { class: "title", text: `${what}: ${err.problem?.title || "error"}` }),
      document.createTextNode(err.problem?.detail ? ` — ${err.problem.detail}` : ""),
    );
  }

  function showStatus(target, text) {
    target.className = "status";
    target.textContent = text;
  }

  function copyButton(text) {
    const button = el("button", { type: "button", class: "copy", text: "Copy" });
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(text);
        button.textContent = "Copied";
      } catch {
        const range = document.createRange();
        range.selectNodeContents(button.previousElementSibling);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        button.textContent = "Selected: press Ctrl-C";
      }
      setTimeout(() => { button.textContent = "Copy"; }, 2000);
    });
    return button;
  }

  /** A uPlot chart that follows its container's width. */
  function lineChart(container, { title, labels, xs, columns, height, formatValue }) {
    container.replaceChildren();
    const width = Math.max(240, container.clientWidth);
    const options = {
      title,
      width,
      height,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      scales: { x: { time: true } },
      legend: { live: true },
      cursor: { points: { size: 7 } },
      axes: [{ values: TIME_AXIS, incrs: TIME_INCRS, space: 60 }, { values: (u, ticks) => ticks.map((t) => brief.format(t)), size: 64 }],
      series: [
        { label: "Time (UTC)", value: "{YYYY}-{MM}-{DD} {HH}:{mm}" },
        ...labels.map((label, i) => ({
          label,
          stroke: PALETTE[i % PALETTE.length],
          width: 2,
          points: { show: xs.length <= 60 },
          spanGaps: false,
          value: (u, v) => formatValue(v),
        })),
      ],
    };
    const chart = new uPlot(options, [xs, ...columns], container);
    const observer = new ResizeObserver(() => chart.setSize({ width: Math.max(240, container.clientWidth), height }));
    observer.observe(container);
    const destroy = chart.destroy.bind(chart);
    chart.destroy = () => { observer.disconnect(); destroy(); };
    return chart;
  }

  // ---- Router -------------------------------------------------------------------------------

  function readHash() {
    const [path, search = ""] = location.hash.replace(/^#/, "").split("?");
    return { view: path === "/ops" ? "ops" : "explore", params: new URLSearchParams(search) };
  }

  function route() {
    const { view, params } = readHash();
    $("explore").hidden = view !== "explore";
    $("ops").hidden = view !== "ops";
    for (const name of ["explore", "ops"]) {
      const link = $(`nav-${name}`);
      if (name === view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    document.title = view === "ops" ? "Operations · Tally console" : "Rollups · Tally console";
    if (view === "ops") startOps(params);
    else {
      stopOps();
      explore(params);
    }
  }

  window.addEventListener("hashchange", route);

  // ---- Explore: rollups as charts and tables --------------------------------------------------

  let rollups = null; // the /v1/rollups list, once loaded
  let chart = null;
  let generation = 0; // drops answers to a query the user has already replaced

  async function loadRollups() {
    if (rollups) return rollups;
    showStatus($("rollups-status"), "Loading…");
    try {
      rollups = (await api("/v1/rollups")).data;
    } catch (err) {
      showError($("rollups-status"), err, "Rollups could not be listed");
      throw err;
    }
    $("rollups-status").textContent = rollups.length ? "" : "No rollups are declared (rollups.toml).";
    return rollups;
  }

  /** What a user can chart: every field the API offers (stored measures, distinct counts, percentiles,
   *  averages), each with how it merges ("union" for a distinct count; "none" for a computed one). */
  function chartable(rollup) {
    const stored = new Map(rollup.measures.map((m) => [m.name, m.merge]));
    const names = rollup.fields?.length ? rollup.fields : rollup.measures.map((m) => m.name);
    return names.map((name) => ({ name, merge: stored.get(name) ?? "none" }));
  }

  function viewFor(rollup, params) {
    const measures = chartable(rollup).map((m) => m.name);
    const dims = rollup.dimensions.map((d) => d.name);
    const granularity = params.get("granularity");
    const defaultGranularity = rollup.granularities.includes("hour") ? "hour" : rollup.granularity;
    const top = Number.parseInt(params.get("top") || "5", 10);
    const split = params.has("split") ? params.get("split") : (dims[0] ?? "");
    return {
      rollup: rollup.name,
      measure: measures.includes(params.get("measure")) ? params.get("measure") : measures[0],
      from: params.get("from") || "-24h",
      to: params.get("to") || "now",
      granularity: rollup.granularities.includes(granularity) ? granularity : defaultGranularity,
      split: dims.includes(split) ? split : "",
      top: Number.isFinite(top) ? Math.min(20, Math.max(1, top)) : 5,
    };
  }

  function writeHash(view) {
    const params = new URLSearchParams(Object.entries(view).map(([k, v]) => [k, String(v)]));
    const hash = `#/explore?${params}`;
    if (location.hash !== hash) location.hash = hash; // hashchange renders it
    else route();
  }

  function renderRollupList(selected) {
    $("rollup-list").replaceChildren(...rollups.map((r) => {
      const button = el("button", { type: "button", "aria-pressed": String(r.name === selected), "data-rollup": r.name },
        r.name, el("span", { class: "detail",
          text: `${plural(r.dimensions.length, "dimension")} · ${plural(chartable(r).length, "measure")} · ${r.granularity}` }));
      button.addEventListener("click", () => writeHash(viewFor(r, new URLSearchParams())));
      return el("li", {}, button);
    }));
  }

  function fillSelect(select, options, value) {
    select.replaceChildren(...options.map(([v, label]) => el("option", { value: v, text: label })));
    select.value = value;
  }

  function renderControls(rollup, view) {
    const form = $("query-form");
    form.hidden = false;
    fillSelect($("measure"), chartable(rollup).map((m) => [m.name, m.name]), view.measure);
    fillSelect($("granularity"), rollup.granularities.map((g) => [g, g]), view.granularity);
    fillSelect($("split"), [["", "(no split)"], ...rollup.dimensions.map((d) => [d.name, d.name])], view.split);
    $("from").value = view.from;
    $("to").value = view.to;
    $("top").value = String(view.top);
    $("top").disabled = !view.split;
    const where = Object.entries(rollup.where).map(([k, v]) => `${k} = ${v.join(" or ")}`).join(", ");
    $("rollup-info").replaceChildren(
      el("h3", { text: rollup.name }),
      el("p", { class: "muted" },
        `Table ${rollup.table}, ${rollup.granularity} buckets`,
        where ? `, only events where ${where}` : "",
        rollup.retention ? `, kept ${rollup.retention}` : ", kept forever",
        "."),
      el("p", { class: "muted" }, "Dimensions: ", el("code", { text: rollup.dimensions.map((d) => d.name).join(", ") || "none" }),
        " · Measures: ", el("code", { text: rollup.measures.map((m) => `${m.name} (${m.merge})`).join(", ") })),
    );
  }

  function currentForm(rollupName) {
    return {
      rollup: rollupName,
      measure: $("measure").value,
      from: $("from").value.trim() || "-24h",
      to: $("to").value.trim() || "now",
      granularity: $("granularity").value,
      split: $("split").value,
      top: Number.parseInt($("top").value, 10) || 5,
    };
  }

  $("query-form").addEventListener("submit", (event) => {
    event.preventDefault();
    writeHash(currentForm(readHash().params.get("rollup")));
  });
  for (const id of ["measure", "granularity", "split"]) {
    $(id).addEventListener("change", () => writeHash(currentForm(readHash().params.get("rollup"))));
  }

  async function explore(params) {
    let list;
    try {
      list = await loadRollups();
    } catch {
      return;
    }
    const rollup = list.find((r) => r.name === params.get("rollup")) || null;
    renderRollupList(rollup?.name);
    if (!rollup) {
      $("query-form").hidden = true;
      $("chart-figure").hidden = true;
      $("table-wrap").hidden = true;
      $("api-urls").replaceChildren();
      $("rollup-info").replaceChildren(el("p", { class: "muted", text: list.length ? "Choose a rollup to chart it." : "" }));
      showStatus($("result-status"), "");
      return;
    }
    const view = viewFor(rollup, params);
    renderControls(rollup, view);
    await runQuery(rollup, view);
  }

  async function runQuery(rollup, view) {
    const mine = ++generation;
    const measure = chartable(rollup).find((m) => m.name === view.measure);
    const calls = plan(view, measure.name);
    const status = $("result-status");
    showStatus(status, "Querying…");
    const urls = [];
    let values = [];
    let totalValues = null;
    let unnamable = [];
    let result;
    try {
      if (calls.top) {
        urls.push(["Top values", calls.top]);
        const top = await api(calls.top);
        values = top.data.map((r) => r[view.split]);
        totalValues = top.meta.total;
        // filter[...] separates values by commas, so a value holding one cannot be asked for.
        unnamable = values.filter((v) => String(v).includes(","));
        values = values.filter((v) => !String(v).includes(","));
      }
      if (calls.top && values.length === 0) {
        result = { data: [], meta: {}, next_cursor: null };
      } else {
        urls.push(["Series", calls.series(values)]);
        result = await api(calls.series(values));
      }
    } catch (err) {
      if (mine !== generation) return;
      renderUrls(urls);
      $("chart-figure").hidden = true;
      $("table-wrap").hidden = true;
      showError(status, err, "The query failed");
      return;
    }
    if (mine !== generation) return;
    renderUrls(urls);
    const rows = result.data;
    if (rows.length === 0) {
      $("chart-figure").hidden = true;
      $("table-wrap").hidden = true;
      showStatus(status, `No data: ${rollup.name} has no rows from ${view.from} to ${view.to}. ` +
        "Widen the range, or check that events are being ingested (Operations).");
      return;
    }
    const split = view.split || null;
    const { xs, keys, columns } = pivot(rows, split, measure.name, values, measure.merge);
    const labels = split ? keys.map(dimensionLabel) : [measure.name];
    const of = split ? `top ${values.length} of ${formatNumber(totalValues)} ${split} values` : "all events";
    const caption = `${measure.name} per ${view.granularity}, ${of}`;
    $("chart-figure").hidden = false;
    $("chart-caption").textContent = caption;
    $("chart").setAttribute("aria-label", `${caption}; the table below lists every value.`);
    if (chart) chart.destroy();
    chart = lineChart($("chart"), { title: "", labels, xs, columns, height: 320, formatValue: formatNumber });
    renderTable(rows, split ? ["bucket", split, measure.name] : ["bucket", measure.name], measure.name, result);
    const more = result.next_cursor ? ` Only the first ${formatNumber(rows.length)} rows are shown: narrow the range or coarsen the granularity.` : "";
    const left = unnamable.length ? ` Left out (a comma cannot be filtered for): ${unnamable.map(dimensionLabel).join("; ")}.` : "";
    showStatus(status, `${formatNumber(rows.length)} rows · ${result.meta.cache} · ${formatNumber(result.meta.query_ms)} ms in Postgres.${more}${left}`);
  }

  function renderUrls(urls) {
    $("api-urls").replaceChildren(...urls.map(([what, path]) => {
      const absolute = new URL(path, location.origin).href;
      return el("div", { class: "url" }, el("span", { class: "what", text: what }), el("code", { text: absolute }), copyButton(absolute));
    }));
  }

  function renderTable(rows, fields, measure, result) {
    const shown = rows.slice(0, MAX_TABLE_ROWS);
    const numeric = (f) => f === measure;
    const caption = shown.length < rows.length
      ? `The first ${formatNumber(shown.length)} of ${formatNumber(rows.length)} rows the API returned.`
      : `The ${formatNumber(rows.length)} rows the API returned, in its order.`;
    $("result-table").replaceChildren(
      el("caption", { text: caption }),
      el("thead", {}, el("tr", {}, ...fields.map((f) => el("th", { scope: "col", class: numeric(f) ? "num" : null, text: f })))),
      el("tbody", {}, ...shown.map((r) => el("tr", {}, ...fields.map((f) => el("td", {
        class: numeric(f) ? "num" : null,
        text: f === "bucket" ? formatBucket(r[f]) : numeric(f) ? formatNumber(r[f]) : dimensionLabel(r[f]),
      }))))),
    );
    $("table-wrap").hidden = false;
  }

  // ---- Operations: lag, throughput, health ---------------------------------------------------

  let opsTimer = null;
  let opsRunning = false;
  let samples = []; // [{at, accepted, applied}] for the rate chart
  let lastCounters = null;
  let rateChart = null;

  const RATE_ROWS = [
    ["tally_ingest_events_accepted_total", "Ingest: events accepted"],
    ["tally_ingest_events_rejected_total", "Ingest: events rejected"],
    ["tally_ingest_backpressure_total", "Ingest: requests refused (backpressure)"],
    ["tally_consumer_events_applied_total", "Consumers: events applied"],
    ["tally_dlq_records_total", "Dead letters"],
  ];

  function startOps(params) {
    const refresh = params.get("refresh");
    if (refresh !== null && [...$("refresh").options].some((o) => o.value === refresh)) $("refresh").value = refresh;
    if (opsRunning) return;
    opsRunning = true;
    pollOps();
  }

  function stopOps() {
    opsRunning = false;
    clearTimeout(opsTimer);
  }

  $("refresh").addEventListener("change", () => {
    const params = new URLSearchParams({ refresh: $("refresh").value });
    location.hash = `#/ops?${params}`;
    clearTimeout(opsTimer);
    if (opsRunning) schedule();
  });

  function schedule() {
    const seconds = Number($("refresh").value);
    if (opsRunning && seconds > 0) opsTimer = setTimeout(pollOps, seconds * 1000);
  }

  async function pollOps() {
    clearTimeout(opsTimer);
    const [ready, lag, counters] = await Promise.allSettled([readiness(), api("/v1/ops/lag"), api("/v1/ops/counters")]);
    if (!opsRunning) return;
    renderHealth(ready);
    renderLag(lag);
    renderRates(counters);
    $("ops-updated").textContent = `Updated ${new Date().toLocaleTimeString(undefined, { hour12: false })}`;
    schedule();
  }

  async function readiness() {
    const response = await fetch("/readyz", { cache: "no-store" });
    return response.json();
  }

  function badge(text, kind) {
    return el("span", { class: `badge ${kind}`, text });
  }

  const STATUS_KIND = { OK: "ok", WARN: "warn", STALL: "bad", STOP: "bad", UNKNOWN: "unknown" };

  function renderHealth(outcome) {
    const list = $("health-list");
    if (outcome.status === "rejected") {
      list.replaceChildren(el("li", {}, "Query service", badge("unreachable", "bad")));
      $("health-note").textContent = String(outcome.reason.message || outcome.reason);
      return;
    }
    const body = outcome.value;
    const names = { kafka: "Kafka", postgres: "Postgres", redis: "Redis" };
    list.replaceChildren(
      ...Object.entries(body.checks).map(([name, ok]) =>
        el("li", { "data-check": name }, names[name] || name, badge(ok ? "up" : "down", ok ? "ok" : "bad"))),
      el("li", { "data-check": "query" }, "Query service", badge(body.draining ? "draining" : body.ready ? "ready" : "not ready",
        body.ready ? "ok" : "bad")),
    );
    $("health-note").textContent = body.degraded.length
      ? `Degraded: ${body.degraded.join(", ")}. Queries still answer from Postgres while Redis is down; lag needs Kafka.`
      : "From the query service's /readyz.";
  }

  function renderLag(outcome) {
    const summary = $("lag-summary");
    const bars = $("lag-bars");
    if (outcome.status === "rejected") {
      showError(summary, outcome.reason, "Lag could not be measured");
      bars.replaceChildren();
      return;
    }
    const report = outcome.value;
    summary.className = "lag-summary";
    summary.replaceChildren(
      badge(report.status, STATUS_KIND[report.status] || "unknown"), " ",
      el("span", { "data-total-records": String(report.total_lag_records) },
        `${plural(report.total_lag_records, "record")} behind`),
      `, oldest ${formatSeconds(report.max_lag_seconds)} · group `, el("code", { text: report.group }),
      " on ", el("code", { text: report.topic }),
    );
    if (report.partitions.length === 0) {
      bars.replaceChildren(el("p", { class: "muted", text: "The topic has no partitions yet: nothing was ingested." }));
      return;
    }
    const maxRecords = Math.max(1, ...report.partitions.map((p) => p.lag_records));
    const maxSeconds = Math.max(1, ...report.partitions.map((p) => p.lag_seconds));
    const bar = (kind, value, max, text, partition) => {
      const fill = el("div", { class: "fill" });
      fill.style.width = `${(100 * value) / max}%`;
      return el("div", { class: `bar ${kind}`, role: "img", "aria-label": `partition ${partition}: ${text}`,
        "data-partition": String(partition), "data-value": String(value) }, fill, el("span", { class: "value", text }));
    };
    bars.replaceChildren(
      el("div", { class: "head", text: "Partition" }), el("div", { class: "head", text: "Records behind" }),
      el("div", { class: "head", text: "Seconds behind" }), el("div", { class: "head status-cell", text: "Verdict" }),
      ...report.partitions.flatMap((p) => [
        el("div", { class: "mono", text: String(p.partition) }),
        bar("records", p.lag_records, maxRecords, plural(p.lag_records, "record"), p.partition),
        bar("seconds", p.lag_seconds, maxSeconds, formatSeconds(p.lag_seconds), p.partition),
        el("div", { class: "status-cell" }, badge(p.status, STATUS_KIND[p.status] || "unknown")),
      ]),
    );
  }

  function renderRates(outcome) {
    const note = $("rate-note");
    if (outcome.status === "rejected") {
      showError(note, outcome.reason, "Counters could not be read");
      return;
    }
    const current = outcome.value;
    if (current.sources.length === 0) {
      $("rate-table").replaceChildren();
      note.className = "muted";
      note.textContent = "No metrics targets are configured: set TALLY_METRICS_TARGETS on the query service to the " +
        "/metrics URLs of the ingest and consumer processes (tally dev does).";
      return;
    }
    const perSecond = rates(lastCounters, current);
    const sum = totals(current);
    lastCounters = current;
    $("rate-table").replaceChildren(
      el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Counter" }),
        el("th", { scope: "col", class: "num", text: "per second" }), el("th", { scope: "col", class: "num", text: "total" }))),
      el("tbody", {}, ...RATE_ROWS.map(([name, label]) => el("tr", { "data-counter": name },
        el("th", { scope: "row", text: label }),
        el("td", { class: "num rate", text: formatRate(perSecond[name]) }),
        el("td", { class: "num total", text: formatNumber(sum[name]) })))),
    );
    const down = current.sources.filter((s) => !s.up);
    note.className = "muted";
    note.textContent = (down.length
      ? `Not answering: ${down.map((s) => `${s.name} (${s.error})`).join(", ")}; left out of the figures. `
      : `From ${current.sources.map((s) => s.name).join(", ")}. `) + "Totals count since each process started.";
    if (perSecond.tally_ingest_events_accepted_total === null) return;
    samples.push([current.at, perSecond.tally_ingest_events_accepted_total, perSecond.tally_consumer_events_applied_total]);
    samples = samples.slice(-RATE_SAMPLES);
    const data = [samples.map((s) => s[0]), samples.map((s) => s[1]), samples.map((s) => s[2])];
    if (!rateChart) {
      rateChart = lineChart($("rate-chart"), {
        title: "", labels: ["accepted/s", "applied/s"], xs: data[0], columns: data.slice(1), height: 180, formatValue: formatRate,
      });
    } else {
      rateChart.setData(data);
    }
  }

  // For the browser tests and anyone debugging in devtools: the pure helpers, nothing stateful.
  window.tallyConsole = Object.freeze({ formatNumber, formatBucket, pivot, rates, totals, plan });

  route();
})();
