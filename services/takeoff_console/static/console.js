// The console's own script: live views fed by server-sent events (queue, item, run charts and logs).
// Text from the services is always set with textContent, never parsed as HTML.
"use strict";

const live = { open: 0, wanted: 0 };

function markLive() {
  document.body.dataset.live = live.open === live.wanted ? "open" : live.open === 0 ? "ended" : "opening";
}

// Opens an event source; `handlers` maps event names to functions of the parsed data. "end" and "failed"
// close it, so the browser does not reconnect to a stream that is over.
function stream(url, handlers) {
  live.wanted += 1;
  const source = new EventSource(url);
  let counted = false;
  source.onopen = () => { if (!counted) { counted = true; live.open += 1; markLive(); } };
  for (const [name, handle] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => handle(JSON.parse(event.data)));
  }
  const close = () => {
    source.close();
    live.wanted -= 1;
    if (counted) live.open -= 1;
    if (live.wanted === 0) document.body.dataset.live = "ended"; else markLive();
  };
  source.addEventListener("end", close);
  source.addEventListener("failed", (event) => {
    const status = document.querySelector("[data-testid=live-status]");
    if (status) status.textContent = JSON.parse(event.data).message;
    close();
  });
  return source;
}

function text(root, selector, value) {
  const node = root.querySelector(selector);
  if (node) node.textContent = value === null || value === undefined ? "" : String(value);
  return node;
}

function shownTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

// A change asked from a live row (cancel, relaunch): sent as htmx sends its own, so the answer is a redirect
// header, not a page.
function post(url) {
  return fetch(url, { method: "POST", headers: { "X-CSRF-Token": document.body.dataset.csrf, "HX-Request": "true" } });
}

// Queue page: items in dispatch order and agents, from WatchQueue.
function queuePage() {
  const items = new Map();
  const agents = new Map();
  const order = (a, b) => {
    const pa = a.state === "PENDING", pb = b.state === "PENDING";
    if (pa !== pb) return pa ? -1 : 1;
    if (pa) return (a.position || 1e9) - (b.position || 1e9);
    return a.enqueue_time < b.enqueue_time ? 1 : -1;
  };
  const render = () => {
    const body = document.getElementById("items");
    const template = document.getElementById("item-row");
    const rows = [...items.values()].sort(order);
    document.getElementById("no-items").hidden = rows.length > 0;
    body.replaceChildren(...rows.map((item) => {
      const row = template.content.firstElementChild.cloneNode(true);
      row.dataset.item = item.id;
      row.dataset.state = item.state;
      text(row, "[data-testid=item-position]", item.position || "");
      const link = text(row, "[data-field=link]", item.id);
      link.href = item.url;
      const state = text(row, "[data-testid=item-state]", item.state);
      state.dataset.state = item.state;
      text(row, "[data-field=job]", item.job);
      text(row, "[data-field=priority]", item.priority);
      text(row, "[data-testid=item-pending-reason]", item.pending_reason);
      text(row, "[data-testid=item-pending-detail]", item.pending_detail);
      text(row, "[data-field=failure]", item.failure);
      text(row, "[data-field=attempt]", item.attempt ? `${item.attempt} of ${item.max_attempts}` : "");
      text(row, "[data-field=enqueued]", shownTime(item.enqueue_time)).dateTime = item.enqueue_time;
      const cancel = row.querySelector("[data-testid=item-cancel]");
      const relaunch = row.querySelector("[data-testid=item-relaunch]");
      cancel.hidden = item.ended;
      relaunch.hidden = !item.ended;
      cancel.onclick = () => post(`${item.url}/cancel`);
      relaunch.onclick = () => post(`${item.url}/relaunch`).then((r) => {
        const target = r.headers.get("hx-redirect");
        if (target) location.href = target;
      });
      return row;
    }));
    const agentBody = document.getElementById("agents");
    const agentTemplate = document.getElementById("agent-row");
    agentBody.replaceChildren(...[...agents.values()].map((agent) => {
      const row = agentTemplate.content.firstElementChild.cloneNode(true);
      row.dataset.agent = agent.id;
      text(row, "[data-field=name]", agent.display_name ? `${agent.display_name} (${agent.id})` : agent.id);
      text(row, "[data-field=state]", agent.connected ? (agent.draining ? "draining" : "connected") : "disconnected");
      text(row, "[data-field=capacity]", agent.capacity);
      text(row, "[data-testid=agent-leases]", agent.leases.map((l) => `${l.item} (${l.state})`).join(", "));
      text(row, "[data-testid=agent-heartbeat]", shownTime(agent.last_heartbeat)).dateTime = agent.last_heartbeat;
      return row;
    }));
  };
  let snapshot = null;
  const apply = (change, into) => {
    for (const item of change.items) into.items.set(item.id, item);
    for (const agent of change.agents) into.agents.set(agent.id, agent);
    for (const gone of change.removed_agents) into.agents.delete(gone);
  };
  stream(document.body.dataset.events, {
    snapshot: (change) => {
      snapshot = snapshot || { items: new Map(), agents: new Map() };
      apply(change, snapshot);
      if (change.snapshot_done) {
        items.clear(); agents.clear();
        snapshot.items.forEach((v, k) => items.set(k, v));
        snapshot.agents.forEach((v, k) => agents.set(k, v));
        snapshot = null;
        render();
      }
    },
    changes: (change) => { apply(change, { items, agents }); render(); },
    queue: (queue) => showPaused(queue.paused),
  });
}

// The pause controls follow the queue's state, also when someone else paused it (the CLI).
function showPaused(paused) {
  const controls = document.getElementById("queue-controls");
  if (controls.dataset.paused === String(paused)) return;
  const template = document.getElementById(paused ? "controls-paused" : "controls-running");
  controls.replaceChildren(template.content.cloneNode(true));
  controls.dataset.paused = String(paused);
  htmx.process(controls);
}

// Item page: state and timeline, from WatchItem.
function itemPage() {
  stream(document.body.dataset.events, {
    item: (item) => {
      const state = text(document, "[data-testid=item-state]", item.state);
      state.dataset.state = item.state;
      text(document, "[data-testid=item-pending-reason]", item.pending_reason);
      text(document, "[data-testid=item-pending-detail]", item.pending_detail);
      text(document, "[data-testid=item-reason]", item.failure);
      text(document, "[data-testid=item-message]", item.message);
      text(document, "[data-testid=item-exit-code]", item.exit_code);
      text(document, "[data-field=attempt]", `${item.attempt} of ${item.max_attempts}`);
      const run = text(document, "[data-testid=item-run-link]", item.run);
      run.href = item.run_url;
      document.querySelector("[data-testid=item-cancel]").hidden = item.ended;
      document.querySelector("[data-testid=item-relaunch]").hidden = !item.ended;
      const timeline = document.querySelector("[data-testid=timeline]");
      timeline.replaceChildren(...item.transitions.map((t) => {
        const entry = document.createElement("li");
        entry.dataset.testid = "timeline-entry";
        entry.dataset.toState = t.to_state;
        const parts = [shownTime(t.time), t.to_state, t.attempt ? `attempt ${t.attempt}` : "", t.agent ? `on ${t.agent}` : "",
          t.reason, t.message, t.actor ? `by ${t.actor}` : ""];
        entry.textContent = parts.filter(Boolean).join("  ");
        return entry;
      }));
    },
  });
}

// Charts: one uPlot per metric; each series is one run's (step, value) points.
class Charts {
  constructor(container) {
    this.container = container;
    this.charts = new Map(); // metric -> {node, plot, series: Map(runKey -> {x: [], y: []})}
    this.pending = false;
  }

  add(runKey, rows) {
    for (const row of rows) {
      for (const [metric, value] of Object.entries(row.values)) {
        if (metric.startsWith("_")) continue;
        const chart = this.chart(metric);
        if (!chart.series.has(runKey)) chart.series.set(runKey, { x: [], y: [] });
        const points = chart.series.get(runKey);
        points.x.push(row.step);
        points.y.push(value);
        chart.dirty = true;
      }
    }
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }
  }

  chart(metric) {
    if (!this.charts.has(metric)) {
      const node = document.createElement("div");
      node.className = "chart";
      node.dataset.testid = "metric-chart";
      node.dataset.metric = metric;
      node.dataset.points = "0";
      const title = document.createElement("h3");
      title.textContent = metric;
      node.append(title);
      const existing = [...this.container.children].find((c) => c.dataset.metric > metric);
      this.container.insertBefore(node, existing || null);
      this.charts.set(metric, { node, plot: null, series: new Map(), dirty: true });
    }
    return this.charts.get(metric);
  }

  draw() {
    for (const [metric, chart] of this.charts) {
      if (!chart.dirty) continue;
      chart.dirty = false;
      const runs = [...chart.series.keys()];
      const tables = runs.map((k) => {
        const s = chart.series.get(k);
        const order = s.x.map((_, i) => i).sort((a, b) => s.x[a] - s.x[b]);
        return [order.map((i) => s.x[i]), order.map((i) => s.y[i])];
      });
      const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
      const points = tables.reduce((sum, t) => sum + t[1].filter((v) => v !== null).length, 0);
      if (!chart.plot || chart.plot.series.length !== runs.length + 1) {
        if (chart.plot) chart.plot.destroy();
        const colors = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#db2777"];
        chart.plot = new uPlot({
          width: Math.max(320, Math.min(560, this.container.clientWidth - 16)),
          height: 220,
          scales: { x: { time: false } },
          series: [{ label: "step" }, ...runs.map((k, i) => ({ label: k, stroke: colors[i % colors.length], width: 1.5, spanGaps: true }))],
          legend: { show: runs.length > 1 },
        }, data, chart.node);
      } else {
        chart.plot.setData(data);
      }
      chart.node.dataset.points = String(points);
      chart.node.dataset.series = String(runs.length);
    }
  }
}

function showRun(run) {
  const state = text(document, "[data-testid=run-state]", run.state);
  state.dataset.state = run.state;
  text(document, "[data-testid=run-state-words]", run.state_words);
  text(document, "[data-testid=run-exit-code]", run.exit_code);
  text(document, "[data-testid=run-failure]", run.failure);
  text(document, "[data-testid=run-summary]", run.summary);
}

// Run page: charts and logs, from ReadMetrics and ReadLogs (both following the run until it ends).
function runPage() {
  const base = document.body.dataset.runUrl;
  const charts = new Charts(document.getElementById("charts"));
  // A resumed run's earlier attempts come first, each announced by a "segment" event: one series per
  // attempt, so each metric is one line coloured by attempt.
  let segment = "run";
  stream(`${base}/metrics/events?attempts=1`, {
    segment: (attempt) => { segment = attempt.label; },
    rows: (rows) => charts.add(segment, rows),
    run: showRun,
  });
  const logs = document.getElementById("logs");
  stream(`${base}/logs/events`, {
    lines: (lines) => {
      const follow = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
      logs.append(...lines.map((line) => {
        const node = document.createElement("div");
        node.dataset.testid = "log-line";
        node.dataset.index = line.index;
        node.className = `log ${line.stream}`;
        if (line.rank !== null) node.dataset.rank = line.rank;
        node.textContent = (line.rank !== null ? `[rank ${line.rank}] ` : "") + line.text;
        return node;
      }));
      if (follow) logs.scrollTop = logs.scrollHeight;
    },
  });
}

// Compare page: every chosen run's metrics overlaid, one chart per metric.
function comparePage() {
  const charts = new Charts(document.getElementById("charts"));
  for (const entry of document.querySelectorAll("[data-testid=compare-run]")) {
    stream(`${entry.dataset.runUrl}/metrics/events`, { rows: (rows) => charts.add(entry.dataset.runId, rows) });
  }
}

// Launch page: the queue choice reloads the form with that queue's variables; JSON fields say at once
// whether they parse (the server checks them again).
function launchPage() {
  const queue = document.querySelector("[data-reload-on-change]");
  if (queue) queue.addEventListener("change", () => {
    const url = new URL(location.href);
    url.searchParams.set("queue", queue.value);
    location.href = url.toString();
  });
  for (const area of document.querySelectorAll("textarea[data-json]")) {
    area.addEventListener("input", () => {
      let problem = "";
      if (area.value.trim()) {
        try {
          const value = JSON.parse(area.value);
          if (typeof value !== "object" || value === null || Array.isArray(value)) problem = "must be a JSON object";
        } catch (error) { problem = `is not valid JSON: ${error.message}`; }
      }
      area.setCustomValidity(problem);
      area.classList.toggle("invalid-json", Boolean(problem));
      area.title = problem;
    });
  }
}

// Times: shown in the browser's own zone.
function localTimes() {
  for (const node of document.querySelectorAll("time")) {
    const value = node.textContent.trim();
    if (value) { node.dateTime = value; node.title = value; node.textContent = shownTime(value); }
  }
}

// The header's project box and an error page's "Back" link: here rather than in inline handlers, which the
// console's Content-Security-Policy does not run.
function navigation() {
  const project = document.querySelector("form[data-project-switch]");
  if (project) project.addEventListener("submit", (event) => {
    event.preventDefault();
    location.href = `/projects/${encodeURIComponent(project.elements.p.value)}/jobs`;
  });
  const back = document.querySelector("a[data-back]");
  if (back && history.length > 1) back.addEventListener("click", (event) => { event.preventDefault(); history.back(); });
}

document.addEventListener("DOMContentLoaded", () => {
  navigation();
  localTimes();
  const pages = { queue: queuePage, item: itemPage, run: runPage, compare: comparePage, launch: launchPage };
  const start = pages[document.body.dataset.page];
  if (start) start();
});
