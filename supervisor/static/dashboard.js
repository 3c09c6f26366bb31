// clip-supervisor dashboard: polls the JSON API of supervisor/dashboard.py and draws the
// page with DOM calls only. Every value from Redis (ids, URLs, errors) goes into the page as
// text (textContent, text nodes, setAttribute), never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "clip-supervisor-token";
  const TOKEN_HEADER = "X-Clip-Token";
  const ID_RE = /^[A-Za-z0-9._-]{1,128}$/;
  const SVG = "http://www.w3.org/2000/svg";
  const SILENT_AFTER = 10; // seconds of main-loop silence worth showing
  const $ = (id) => document.getElementById(id);
  // jobStates and jobFields come from /api/info (worker/protocol.py): the page names no
  // job state of its own.
  const state = { actions: false, search: "", timers: {}, jobStates: [], jobFields: {} };

  // --- small helpers ---------------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== undefined && child !== null) node.append(child); // strings become text
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function jobLink(id) {
    if (!id) return "–";
    if (!ID_RE.test(String(id))) return String(id);
    return el("a", { href: "/job/" + encodeURIComponent(id), text: String(id) });
  }

  function duration(seconds) {
    const s = Math.max(0, Math.floor(Number(seconds) || 0));
    if (s < 120) return s + "s";
    if (s < 7200) return Math.floor(s / 60) + "m " + (s % 60) + "s";
    if (s < 172800) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
    return Math.floor(s / 86400) + "d";
  }

  function clock(iso) {
    const d = new Date(iso);
    return isNaN(d) ? String(iso || "–") : d.toLocaleTimeString();
  }

  function timeCell(iso) {
    return el("td", { class: "nowrap", title: String(iso || ""), text: clock(iso) });
  }

  function seconds(value) {
    const n = Number(value);
    return isFinite(n) ? (n < 10 ? n.toFixed(2) : n.toFixed(1)) + " s" : "–";
  }

  function progressBar(percent) {
    const p = Math.max(0, Math.min(100, Number(percent) || 0));
    const fill = el("div", { class: "fill" });
    fill.style.width = p + "%";
    return el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0",
                       "aria-valuemax": "100", "aria-valuenow": p.toFixed(1) },
              fill, el("span", { class: "label", text: p.toFixed(0) + "%" }));
  }

  function badge(text, kind) {
    return el("span", { class: "badge " + (kind || text), text: String(text) });
  }

  function emptyRow(tbody, columns, text) {
    tbody.replaceChildren(el("tr", {}, el("td", { class: "empty", colspan: String(columns),
                                                  text })));
  }

  function notice(text, isError) {
    const box = $("notice");
    box.textContent = text;
    box.className = isError ? "error" : "";
    box.hidden = false;
  }

  function setStatus(ok, error) {
    const status = $("status");
    status.className = "status " + (ok ? "ok" : "down");
    status.textContent = ok ? "live · " + new Date().toLocaleTimeString()
                            : "disconnected: " + (error && error.message || error);
  }

  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = new Error(data.error || response.status + " " + response.statusText);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  // Poll fn every ms, one request in flight at a time; calling the returned function polls
  // now (after the request in flight, if any).
  function every(name, ms, fn) {
    let running = false, again = false;
    const tick = async () => {
      clearTimeout(state.timers[name]);
      if (running) { again = true; return; }
      running = true;
      try {
        await fn();
        setStatus(true);
      } catch (error) {
        setStatus(false, error);
      }
      running = false;
      if (again) { again = false; tick(); return; }
      state.timers[name] = setTimeout(tick, ms);
    };
    state.timers[name] = setTimeout(tick, 0);
    return tick;
  }

  // --- actions (POST, token in a header) -------------------------------------------------

  async function act(path, body, label) {
    const headers = { "Content-Type": "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers[TOKEN_HEADER] = token;
    try {
      const response = await fetch(path, { method: "POST", headers, credentials: "same-origin",
                                           body: JSON.stringify(body || {}) });
      const data = await response.json().catch(() => ({}));
      if (!response.ok) {
        notice(label + " refused (" + response.status + "): " + (data.error || ""), true);
      } else if (data.purged !== undefined) {
        notice(label + ": purged " + data.purged + " dead letter(s)");
      } else if (data.cancelled !== undefined) {
        notice(label + ": " + (data.removed ? "taken out of the queue, dead-lettered"
          : data.cancelled ? "running: its worker aborts it"
          : "not cancelled (" + (data.state || "no such job queued or running") + ")"),
               !data.cancelled);
      } else {
        notice(label + ": requeued " + data.requeued + " dead letter(s)" +
               (data.missing && data.missing.length ? "; not found: " + data.missing.join(", ")
                                                    : ""));
      }
    } catch (error) {
      notice(label + " failed: " + error.message, true);
    }
    refresh();
  }

  function retryButton(letter) {
    const button = el("button", { type: "button", class: "retry", text: "Retry",
                                  "data-job": String(letter.id || "") });
    button.disabled = !state.actions || !letter.retryable;
    button.addEventListener("click", () => act("/api/dead/retry", { id: String(letter.id) },
                                                "retry " + letter.id));
    return button;
  }

  // --- overview ---------------------------------------------------------------------------

  // One banner per host whose live workers report a host fault (a full or read-only disk,
  // ffmpeg missing): that host takes no jobs until the fault clears.
  function drawFaults(data) {
    const hosts = new Map();
    for (const w of data.workers || []) {
      if (!w.alive || !w.fault) continue;
      const host = String(w.host ?? "?");
      const since = Number(w.fault_since) || data.time;
      const known = hosts.get(host);
      if (!known || since < known.since) {
        hosts.set(host, { since, reason: String(w.fault), error: String(w.fault_error || ""),
                          workers: (known ? known.workers : 0) + 1 });
      } else {
        known.workers += 1;
      }
    }
    const box = $("faults");
    box.replaceChildren(...[...hosts.entries()].sort().map(([host, f]) => el("div",
      { class: "fault", role: "alert", "data-host": host },
      el("strong", { text: host }),
      " paused since " + new Date(f.since * 1000).toLocaleTimeString() +
        " (" + duration(data.time - f.since) + "): ",
      badge(f.reason, "reason"),
      " " + f.error + " · " + f.workers + " worker" + (f.workers === 1 ? "" : "s") +
        " waiting; it resumes by itself once the fault is fixed.")));
    box.hidden = hosts.size === 0;
  }

  // One banner per worker slot of this supervisor that gave up starting workers (FATAL):
  // only this master knows of them (such a slot has no worker in Redis).
  function drawFatal(data) {
    const box = $("fatal");
    const host = String(data.host ?? "?");
    box.replaceChildren(...(data.fatal || []).map((f) => el("div",
      { class: "fatal-slot", role: "alert", "data-slot": String(f.slot) },
      el("strong", { text: host }),
      " worker slot " + f.slot + " gave up (FATAL) at " +
        new Date(Number(f.since) * 1000).toLocaleTimeString() + " after failing to start " +
        f.failures + " times in a row; last: " + String(f.last_failure || "?") +
        ". Fix the cause, then send HUP or TTIN to the supervisor.")));
    box.hidden = !(data.fatal || []).length;
  }

  // A worker's main loop that has shown no sign of life for a while (its heartbeat says
  // how long): its supervisor kills it once that passes what it may legitimately take.
  function loopSilence(w) {
    const silent = Number(w.loop_silent);
    if (!w.alive || !(silent >= SILENT_AFTER)) return null;
    return el("span", { class: "silent", title: "seconds since the worker's main loop last " +
                        "showed a sign of life", text: " loop silent " + duration(silent) });
  }

  function drawStats(data) {
    $("prefix").textContent = "prefix " + data.prefix;
    drawFaults(data);
    drawWebhookFailures(data.webhook_failures);
    for (const [name, length] of Object.entries(data.queues)) {
      $("q-" + name).textContent = String(length);
    }
    const tbody = $("workers").tBodies[0];
    const workers = data.workers || [];
    $("workers-count").textContent = "(" + workers.length + ", all hosts)";
    if (!workers.length) return emptyRow(tbody, 8, "no workers registered");
    tbody.replaceChildren(...workers.map((w) => {
      // A paused worker holds no job (it gave it back), whatever its last beat named.
      const paused = Boolean(w.alive && w.fault);
      const job = paused ? null : w.job;
      const row = el("tr", { "data-worker": String(w.id) },
        el("td", { text: String(w.host ?? "?") }),
        el("td", { text: String(w.pid ?? "") }),
        el("td", { text: String(w.slot ?? "") }),
        el("td", { text: duration(w.uptime) }),
        el("td", {}, badge(w.status), loopSilence(w)),
        el("td", { class: "id" }, jobLink(job)),
        el("td", {}, job ? progressBar(w.progress) : ""),
        el("td", { text: String(w.jobs_done ?? 0) }));
      return row;
    }));
  }

  // Webhook deliveries given up (all hosts): the count by outcome and the newest records.
  // A record names its receiver by origin only; the server never stores a path or query.
  function drawWebhookFailures(failures) {
    const f = failures || { total: 0, by_outcome: {}, recent: [] };
    $("webhooks-total").textContent = String(f.total ?? 0);
    const outcomes = Object.entries(f.by_outcome || {}).map(([o, n]) => o + " " + n);
    $("webhooks-count").textContent = "(" + (f.total ?? 0) + " given up" +
      (outcomes.length ? ": " + outcomes.join(", ") : "") +
      ((f.recent || []).length ? "; newest " + f.recent.length + " below" : "") + ")";
    const tbody = $("webhooks").tBodies[0];
    if (!(f.recent || []).length) return emptyRow(tbody, 7, "no webhook failures");
    tbody.replaceChildren(...f.recent.map((r) => el("tr",
      { "data-event": String(r.event_id || ""), "data-job": String(r.job_id || "") },
      timeCell(r.time),
      el("td", { class: "id" }, jobLink(r.job_id)),
      el("td", { text: String(r.type || "") }),
      el("td", { class: "wrap", text: String(r.origin || "") }),
      el("td", {}, badge(r.outcome || "?", "reason")),
      el("td", { text: String(r.attempts ?? "") }),
      el("td", {}, el("pre", { text: String(r.error || "") })))));
  }

  function drawRecent(data) {
    const dead = $("dead").tBodies[0];
    $("dead-count").textContent = data.q ? "(matching “" + data.q + "”)" : "";
    if (!data.dead.length) emptyRow(dead, 7, data.q ? "no match" : "no dead letters");
    else dead.replaceChildren(...data.dead.map((letter) => el("tr",
      { "data-job": String(letter.id || "") },
      timeCell(letter.time),
      el("td", { class: "id" }, jobLink(letter.id)),
      el("td", {}, badge(letter.reason || "?", "reason")),
      el("td", { text: String(letter.attempts ?? "") }),
      el("td", { class: "wrap", text: String(letter.url || "") }),
      el("td", {}, el("pre", { text: String(letter.error || "") })),
      el("td", {}, retryButton(letter)))));

    const done = $("done").tBodies[0];
    if (!data.done.length) emptyRow(done, 6, data.q ? "no match" : "no completions yet");
    else done.replaceChildren(...data.done.map((event) => {
      const stages = Object.entries(event.timings || {})
        .map(([stage, s]) => stage + " " + seconds(s)).join(" · ");
      return el("tr", { "data-job": String(event.id || "") },
        timeCell(event.time),
        el("td", { class: "id" }, jobLink(event.id)),
        el("td", { class: "wrap", text: String(event.output || "") }),
        el("td", { class: "nowrap", text: seconds(event.duration) }),
        el("td", { class: "nowrap", text: seconds(event.elapsed) }),
        el("td", { text: stages + (event.reused ? " (already stored)" : "") }));
    }));
  }

  function drawChart(data) {
    const chart = $("chart");
    // Drawn in the chart's own pixels, so that its labels keep their shape at any width.
    const width = Math.max(200, Math.round(chart.getBoundingClientRect().width) || 720);
    const height = 130, top = 14, bottom = 16;
    chart.setAttribute("viewBox", "0 0 " + width + " " + height);
    const slot = width / data.minutes;
    const peak = Math.max(1, ...data.done.map((d, i) => d + data.failed[i]));
    const scale = (height - top - bottom) / peak;
    const nodes = [
      svg("line", { class: "grid", x1: 0, x2: width, y1: height - bottom,
                    y2: height - bottom }),
      svg("text", { class: "axis", x: 2, y: 10 }, "max " + peak + "/min"),
      svg("text", { class: "axis", x: 2, y: height - 3 }, "-" + data.minutes + " min"),
      svg("text", { class: "axis", x: width - 2, y: height - 3, "text-anchor": "end" }, "now"),
    ];
    data.done.forEach((done, i) => {
      const failed = data.failed[i];
      if (!done && !failed) return;
      const x = i * slot + 1, w = Math.max(1, slot - 2);
      const minute = new Date((data.start + i * 60) * 1000);
      const group = svg("g", {});
      group.append(svg("title", {}, minute.toLocaleTimeString([], { hour: "2-digit",
        minute: "2-digit" }) + ": " + done + " done, " + failed + " failed"));
      const hDone = done * scale, hFailed = failed * scale;
      if (done) {
        group.append(svg("rect", { class: "bar-done", x, width: w, height: hDone,
                                   y: height - bottom - hDone }));
      }
      if (failed) {
        group.append(svg("rect", { class: "bar-failed", x, width: w, height: hFailed,
                                   y: height - bottom - hDone - hFailed }));
      }
      nodes.push(group);
    });
    chart.replaceChildren(...nodes);
    const sum = (list) => list.reduce((a, b) => a + b, 0);
    $("chart-total").textContent =
      "(" + sum(data.done) + " done, " + sum(data.failed) + " failed)";
  }

  // --- job page ---------------------------------------------------------------------------

  function drawJob(record) {
    const fields = record.fields || {};
    const jobState = record.state || "unknown";
    const stateBadge = $("job-state");
    stateBadge.textContent = jobState + (fields.stage && fields.stage !== jobState
                                         ? " · " + fields.stage : "");
    stateBadge.className = "badge " + (state.jobStates.includes(jobState) ? jobState
                                                                          : "unknown");
    $("job-progress").replaceChildren(progressBar(fields.progress));
    // The server says whether the job can still be cancelled (it has not ended).
    $("job-cancel").disabled = !state.actions || !record.cancellable;
    $("job-missing").hidden = true;
    const extra = [["attempts (counter)", record.attempts ?? "–"],
                   ["expires in", record.ttl ? duration(record.ttl) : "–"]];
    const rows = Object.entries(fields).concat(extra).map(([key, value]) => el("tr",
      { "data-field": key }, el("td", { text: key, title: state.jobFields[key] }),
      el("td", {}, el("pre", { text: String(value) }))));
    $("job-fields").tBodies[0].replaceChildren(...rows);
    const dead = $("job-dead").tBodies[0];
    if (!record.dead.length) return emptyRow(dead, 6, "none");
    dead.replaceChildren(...record.dead.map((letter) => el("tr", {},
      timeCell(letter.time),
      el("td", {}, badge(letter.reason || "?", "reason")),
      el("td", { text: String(letter.attempts ?? "") }),
      el("td", {}, el("pre", { text: String(letter.error || "") })),
      el("td", {}, el("pre", { text: String(letter.message ?? ("base64: " +
                                                                letter.message_b64)) })),
      el("td", {}, retryButton({ id: letter.id,
                                 retryable: "message" in letter || "message_b64" in letter })))));
  }

  // --- wiring -----------------------------------------------------------------------------

  let refresh = () => {};

  function setupToken() {
    const input = $("token");
    const use = () => {
      const value = input.value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
      input.value = "";
      showMode();
    };
    $("token-use").addEventListener("click", use);
    input.addEventListener("keydown", (event) => { if (event.key === "Enter") use(); });
  }

  function showMode() {
    const hasToken = Boolean(sessionStorage.getItem(TOKEN_KEY));
    $("mode").textContent = !state.actions ? "read-only (no auth_token set)"
      : hasToken ? "actions enabled (token set for this tab)" : "enter the token for actions";
    $("token").hidden = $("token-use").hidden = !state.actions;
    $("token-use").textContent = hasToken ? "Change token" : "Use token";
    for (const id of ["retry-all", "purge"]) $(id).disabled = !state.actions;
  }

  async function start() {
    setupToken();
    try {
      const info = await getJSON("/api/info");
      state.actions = Boolean(info.actions);
      state.jobStates = info.job_states || [];
      state.jobFields = info.job_fields || {};
      $("prefix").textContent = "prefix " + info.prefix;
    } catch (error) {
      setStatus(false, error);
    }
    showMode();
    const path = window.location.pathname;
    if (path.startsWith("/job/")) {
      const id = decodeURIComponent(path.slice(5));
      $("job-view").hidden = false;
      $("job-id").textContent = id;
      document.title = "job " + id + " · clip-supervisor";
      $("job-cancel").addEventListener("click", () => {
        if (confirm("Cancel job " + id + "?")) {
          act("/api/job/" + encodeURIComponent(id) + "/cancel", {}, "cancel " + id);
        }
      });
      refresh = every("job", 1000, async () => {
        try {
          drawJob(await getJSON("/api/job/" + encodeURIComponent(id)));
        } catch (error) {
          if (error.status !== 404) throw error;
          $("job-missing").hidden = false;
          $("job-missing").textContent = error.message;
        }
      });
      return;
    }
    $("overview").hidden = false;
    const stats = every("stats", 1000, async () => drawStats(await getJSON("/api/stats")));
    every("slots", 2000, async () => drawFatal(await getJSON("/api/slots")));
    const recent = every("recent", 2000, async () => drawRecent(await getJSON(
      "/api/recent?q=" + encodeURIComponent(state.search))));
    every("chart", 10000, async () => drawChart(await getJSON("/api/throughput")));
    refresh = () => { stats(); recent(); };

    let debounce;
    $("search").addEventListener("input", (event) => {
      state.search = event.target.value.trim();
      const open = $("search-open");
      open.hidden = !ID_RE.test(state.search);
      if (!open.hidden) open.setAttribute("href", "/job/" + encodeURIComponent(state.search));
      clearTimeout(debounce);
      debounce = setTimeout(recent, 250);
    });
    $("retry-all").addEventListener("click", () => {
      if (confirm("Requeue every dead letter?")) act("/api/dead/retry-all", {}, "retry all");
    });
    $("purge").addEventListener("click", () => {
      if (confirm("Delete every dead letter for good?")) act("/api/dead/purge", {}, "purge");
    });
  }

  document.addEventListener("DOMContentLoaded", start);
})();
