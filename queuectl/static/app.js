// queuectl dashboard: polls the JSON API and redraws. No framework, no external assets.
// Every value from the queue (commands, output, errors) is inserted as text, never as HTML.
"use strict";
(function () {
  const STATES = ["pending", "processing", "completed", "failed", "dead", "cancelled"];
  const POLL_MS = 2000;
  const TOKEN_KEY = "queuectl-dashboard-token";
  const TOKEN_HEADER = "X-Queuectl-Token";
  const $ = (id) => document.getElementById(id);

  let selected = null;          // id of the job shown in the detail panel
  let detail = null;            // its last loaded record
  let paused = false;
  let timer = null;
  let busy = false;
  let again = false;            // a refresh was asked for while one was running
  let lastJobs = null, lastNow = 0;

  // -- the URL fragment: #token=... (kept for this tab only, then dropped from the address
  // bar) and #job=ID (that job's details: every job has a link of its own) -----------------
  function hashParam(name) {
    const m = new RegExp("(?:^#|&)" + name + "=([^&]*)").exec(location.hash);
    if (!m) return null;
    try { return decodeURIComponent(m[1]); } catch (e) { return null; }
  }

  function jobHash(id) {
    return id ? "#job=" + encodeURIComponent(id) : "";
  }

  function takeToken() {
    const given = hashParam("token");
    if (given !== null) {
      try { sessionStorage.setItem(TOKEN_KEY, given); } catch (e) { /* private mode */ }
      history.replaceState(null, "", location.pathname + location.search + jobHash(hashParam("job")));
    }
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }
  let token = takeToken();
  selected = hashParam("job") || null;

  function showTokenState() {
    $("token-form").hidden = !!token;
    $("token-status").textContent = token ? "actions enabled" : "";
    for (const b of document.querySelectorAll("button.action")) {
      b.title = token ? "" : "Needs the dashboard's token (printed at start-up, or the one given with --token)";
    }
  }

  // -- helpers --------------------------------------------------------------------------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (k === "className") node.className = v;
        else if (k === "title") node.title = v;
        else if (k === "onclick") node.addEventListener("click", v);
        else node.setAttribute(k, v);
      }
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function stateBadge(state) {
    return el("span", { className: "state " + state }, state);
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    seconds = Math.max(0, seconds);
    if (seconds < 1) return Math.round(seconds * 1000) + "ms";
    if (seconds < 60) return seconds.toFixed(1) + "s";
    let m = Math.floor(seconds / 60);
    const s = Math.floor(seconds % 60);
    if (m < 60) return m + "m" + String(s).padStart(2, "0") + "s";
    const h = Math.floor(m / 60); m %= 60;
    if (h < 48) return h + "h" + String(m).padStart(2, "0") + "m";
    return Math.floor(h / 24) + "d" + String(h % 24).padStart(2, "0") + "h";
  }

  function instant(epoch) {
    if (!epoch) return "–";
    const d = new Date(epoch * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  function when(job, now) {
    if (job.state === "pending" || job.state === "failed") {
      if (job.deps_left > 0) return "after deps";
      return job.run_at <= now ? "now" : "in " + duration(job.run_at - now);
    }
    if (job.state === "processing") return "for " + duration(now - job.started_at);
    const t = job.finished_at || job.updated_at;
    return duration(now - t) + " ago";
  }

  async function api(path, method) {
    const headers = { "Accept": "application/json" };
    if (token) headers[TOKEN_HEADER] = token;
    const res = await fetch(path, { method: method || "GET", headers, cache: "no-store",
                                    credentials: "same-origin" });
    let body = null;
    try { body = await res.json(); } catch (e) { /* not JSON */ }
    if (!res.ok) {
      const err = new Error((body && body.error) || ("HTTP " + res.status));
      err.status = res.status;
      throw err;
    }
    return body;
  }

  function say(text, isError) {
    const box = $("message");
    box.textContent = text;
    box.className = "banner" + (isError ? " banner-error" : "");
    box.hidden = false;
    clearTimeout(say.timer);
    say.timer = setTimeout(() => { box.hidden = true; }, isError ? 8000 : 4000);
  }

  async function act(path, done) {
    if (!token) {
      say("Actions need the token printed by `queuectl dashboard`: paste it in the box at the top.", true);
      $("token-form").hidden = false;
      $("token-input").focus();
      return;
    }
    try {
      const r = await api(path, "POST");
      say(done(r));
    } catch (e) {
      if (e.status === 403 && /token/i.test(e.message)) {
        token = "";
        try { sessionStorage.removeItem(TOKEN_KEY); } catch (x) { /* ignore */ }
        showTokenState();
      }
      say(e.message, true);
    }
    refresh();
  }

  const retry = (id) => act("/api/jobs/" + encodeURIComponent(id) + "/retry",
                             () => "Job " + id + " queued to run again.");
  const cancel = (id) => act("/api/jobs/" + encodeURIComponent(id) + "/cancel",
                              (r) => r.result === "cancelling" ? "Job " + id + ": its worker is killing it."
                                                               : "Job " + id + " cancelled.");

  // -- rendering ------------------------------------------------------------------------
  function renderStatus(s) {
    for (const state of STATES) $("count-" + state).textContent = s.jobs[state];
    $("count-total").textContent = s.total;
    paused = s.paused;
    const badge = $("queue-state");
    badge.textContent = paused ? "PAUSED since " + instant(s.paused_since) : "running";
    badge.className = "badge " + (paused ? "badge-paused" : "badge-running");
    const toggle = $("pause-toggle");
    toggle.textContent = paused ? "Resume" : "Pause";
    toggle.disabled = false;
    $("version").textContent = s.version;

    const rows = s.workers.map((w) => el("tr", null,
      el("td", { className: "num mono" }, w.pid),
      el("td", null, stateBadge(w.state)),
      el("td", { className: "num" }, (w.busy_slots ?? (w.job ? 1 : 0)) + "/" + (w.slots ?? 1)),
      el("td", { className: "mono" }, ...jobLinks(w.jobs && w.jobs.length ? w.jobs : (w.job ? [w.job] : []))),
      el("td", { className: "num" }, duration(w.uptime)),
      el("td", { className: "muted" }, w.mode)));
    const busyCount = s.workers.filter((w) => w.state === "busy").length;
    const slots = s.workers.reduce((n, w) => n + (w.slots ?? 1), 0);
    const busySlots = s.workers.reduce((n, w) => n + (w.busy_slots ?? 0), 0);
    $("workers-summary").textContent = s.workers.length + " running · " + busyCount + " busy" +
      (slots > s.workers.length ? " · " + busySlots + "/" + slots + " slots busy" : "");
    fill("workers-table", rows, 6, "No workers running. Start some: queuectl worker start --count 2");

    const schedules = s.schedules || [];
    fill("schedules-table", schedules.map((c) => el("tr", null,
      el("td", { className: "mono" }, c.name),
      el("td", { className: "mono" }, c.when),
      el("td", null, c.paused ? "paused" : instant(c.next_at) + " (in " + duration(Math.max(c.next_at - s.now, 0)) + ")"),
      el("td", null, ...(c.last_job ? [jobLink(c.last_job), " ", stateBadge(c.last_state || "purged")] : ["–"])))),
      4, "No schedules. Add one: queuectl schedule add NAME --cron '0 2 * * *' COMMAND");
    const pausedCount = schedules.filter((c) => c.paused).length;
    $("schedules-summary").textContent = schedules.length + " · " + pausedCount + " paused";
    const groups = (s.groups || []).map((g) => el("tr", null,
      el("td", { className: "mono" }, g.name),
      el("td", { className: "num" }, g.parallel === null ? "–" : g.parallel),
      el("td", { className: "num" }, g.running),
      el("td", { className: "num" }, g.waiting),
      el("td", null, g.paused ? "paused" : "–")));
    fill("groups-table", groups, 5, "No groups yet.");
  }

  function jobLinks(ids) {  // a multi-slot worker runs several: links separated by spaces
    return ids.length ? ids.flatMap((id, i) => i ? [" ", jobLink(id)] : [jobLink(id)]) : ["–"];
  }

  function jobLink(id) {
    return el("a", { href: jobHash(id), className: "job-link",
                     onclick: (ev) => { ev.preventDefault(); ev.stopPropagation(); select(id); } }, id);
  }

  function fill(tableId, rows, columns, emptyText) {
    const body = $(tableId).tBodies[0];
    if (!rows.length) rows = [el("tr", null, el("td", { className: "empty", colspan: String(columns) }, emptyText))];
    body.replaceChildren(...rows);
  }

  function renderJobs(data, now) {
    const needle = $("filter-text").value.trim().toLowerCase();
    const jobs = data.jobs.filter((j) => !needle ||
      [j.id, j.command_text, j.last_error || ""].some((t) => String(t).toLowerCase().includes(needle)));
    const rows = jobs.map((j) => {
      const tr = el("tr", { "data-id": j.id },
        el("td", { className: "id mono" }, jobLink(j.id)),
        el("td", { className: "when" }, stateBadge(j.state), j.cancel_requested ? " cancelling" : null),
        el("td", { className: "num" }, j.attempts),
        el("td", { className: "num" }, j.priority),
        el("td", { className: "when" }, when(j, now)),
        el("td", { className: "cmd", title: j.command_text + (j.last_error ? "\n" + j.last_error : "") },
           el("div", { className: "mono clip" }, j.command_text),
           j.last_error && j.state !== "completed" ? el("div", { className: "err clip small" }, j.last_error) : null));
      if (j.id === selected) tr.classList.add("selected");
      tr.addEventListener("click", () => select(j.id));
      return tr;
    });
    fill("jobs-table", rows, 6, needle ? "No job matches the filter." : "No jobs.");
    let note = "Newest first; showing " + jobs.length + (needle ? " matching of " + data.jobs.length : "") + ".";
    if (data.more) note += " Older jobs exist: raise “Show” or use `queuectl list`.";
    $("jobs-note").textContent = note;
  }

  function renderDlq(data, now) {
    const rows = data.jobs.map((j) => el("tr", null,
      el("td", { className: "id mono" }, jobLink(j.id)),
      el("td", { className: "num" }, j.attempts),
      el("td", null, duration(now - (j.finished_at || j.updated_at)) + " ago"),
      el("td", { className: "err", title: j.last_error || "" }, j.last_error || ""),
      el("td", null, el("button", { type: "button", className: "action", "data-retry": j.id,
                                    onclick: () => retry(j.id) }, "Retry"))));
    $("dlq-summary").textContent = data.jobs.length + (data.more ? "+" : "") + " dead";
    fill("dlq-table", rows, 5, "Empty: no job has exhausted its retries.");
  }

  function renderDetail(job, now) {
    detail = job;
    $("detail-empty").hidden = !!job;
    $("detail-body").hidden = !job;
    $("detail-retry").hidden = !job || !(job.state === "failed" || job.state === "dead");
    $("detail-cancel").hidden = !job || !["pending", "failed", "processing"].includes(job.state) || !!job.cancel_requested;
    $("detail-id").textContent = job ? job.id : "";
    if (!job) return;
    const fields = [
      ["state", [stateBadge(job.state), job.cancel_requested ? " (cancel requested)" : ""]],
      ["command", el("code", null, job.command_text)],
      ["attempts", job.attempts + " (max retries " + job.effective_max_retries + ")"],
      ["priority", job.priority],
      ["timeout", job.effective_timeout ? duration(job.effective_timeout) : "none"],
      ["cwd", job.cwd || "–"],
      ["created", instant(job.created_at)],
    ];
    if (job.state === "pending" || job.state === "failed") fields.push(["next run", instant(job.run_at) + " (" + when(job, now) + ")"]);
    if (job.started_at) fields.push(["started", instant(job.started_at)]);
    if (job.finished_at) fields.push(["finished", instant(job.finished_at)]);
    if (job.worker_id) fields.push(["worker", job.worker_id]);
    if (job.after && job.after.length) fields.push(["after", job.after.join(", ") + " (" + job.deps_left + " not completed)"]);
    if (job.unique_key) fields.push(["unique key", job.unique_key]);
    fields.push(["exit code", job.exit_code === null ? "–" : job.exit_code]);
    fields.push(["last error", job.last_error || "–"]);
    fields.push(["log file", job.log_file === null ? "none: the run printed nothing" : el("code", null, job.log_file)]);
    const dl = $("detail-fields");
    dl.replaceChildren(...fields.flatMap(([k, v]) => [el("dt", null, k), el("dd", null, ...(Array.isArray(v) ? v : [v]))]));

    const out = $("detail-output");
    const atBottom = out.scrollHeight - out.scrollTop - out.clientHeight < 20;
    out.textContent = job.output || "(no output captured)";
    if (atBottom) out.scrollTop = out.scrollHeight;

    const runs = (job.runs || []).map((r) => el("tr", null,
      el("td", { className: "num" }, r.attempt),
      el("td", null, instant(r.started_at)),
      el("td", { className: "num" }, r.started_at && r.finished_at ? duration(r.finished_at - r.started_at) : "–"),
      el("td", { className: r.exit_code === 0 && !r.error ? "" : "err" },
         r.exit_code === 0 && !r.error ? "ok" : (r.error || "exit " + r.exit_code))));
    fill("detail-runs", runs, 4, job.state === "processing" ? "First run in progress." : "Not run yet.");
  }

  function select(id) {
    selected = id;
    if (location.hash !== jobHash(id)) history.replaceState(null, "", location.pathname + location.search + jobHash(id));
    for (const tr of $("jobs-table").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.id === id);
    refresh();
  }

  // -- polling --------------------------------------------------------------------------
  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    again = false;
    clearTimeout(timer);
    try {
      const state = $("filter-state").value;
      const limit = $("filter-limit").value;
      const q = "/api/jobs?limit=" + encodeURIComponent(limit) + (state ? "&state=" + encodeURIComponent(state) : "");
      const wanted = selected;
      const [status, jobs, dlq, job] = await Promise.all([
        api("/api/status"), api(q), api("/api/jobs?state=dead&limit=200"),
        wanted ? api("/api/jobs/" + encodeURIComponent(wanted)).catch((e) => {
          if (e.status === 404) {
            selected = null;
            if (hashParam("job") !== null) history.replaceState(null, "", location.pathname + location.search);
            return null;
          }
          throw e;
        }) : Promise.resolve(null),
      ]);
      const now = status.now;
      renderStatus(status);
      lastJobs = jobs; lastNow = now;
      renderJobs(jobs, now);
      renderDlq(dlq, now);
      renderDetail(job, now);
      $("conn-error").hidden = true;
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = "1";
    } catch (e) {
      const box = $("conn-error");
      box.textContent = "Cannot refresh: " + e.message + " (is `queuectl dashboard` still running?). Retrying…";
      box.hidden = false;
    } finally {
      busy = false;
      if (again) timer = setTimeout(refresh, 0);
      else if (!document.hidden) timer = setTimeout(refresh, POLL_MS);
    }
  }

  window.addEventListener("hashchange", () => {
    const id = hashParam("job");
    if (id && id !== selected) select(id);
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  $("filter-state").addEventListener("change", refresh);
  $("filter-limit").addEventListener("change", refresh);
  $("filter-text").addEventListener("input", () => { if (lastJobs) renderJobs(lastJobs, lastNow); });
  $("pause-toggle").addEventListener("click", () => {
    if (paused) act("/api/resume", () => "Queue resumed: workers claim jobs again.");
    else act("/api/pause", () => "Queue paused: running jobs finish, nothing new starts.");
  });
  $("detail-retry").addEventListener("click", () => detail && retry(detail.id));
  $("detail-cancel").addEventListener("click", () => detail && cancel(detail.id));
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token-input").value.trim();
    $("token-input").value = "";
    try { sessionStorage.setItem(TOKEN_KEY, token); } catch (e) { /* ignore */ }
    showTokenState();
  });

  showTokenState();
  refresh();
})();
