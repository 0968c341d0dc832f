// clusterpy monitor page: renders the snapshots the server pushes (Server-Sent Events).
// No framework and no external code: DOM building with textContent only (job ids, errors and
// tracebacks are untrusted text), and a hand-drawn canvas chart.
"use strict";

(function () {
  const token = document.querySelector('meta[name="clusterpy-token"]').content;
  const STATUSES = ["Created", "Running", "Finished", "Terminated", "Cancelled", "Abandoned"];
  let last = null;

  // The cookie set with this page carries the token from now on: keep it out of the address bar.
  if (location.search.includes("token=")) history.replaceState(null, "", location.pathname);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
    return node;
  }

  function duration(s) {
    if (s == null) return "–";
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " m " + Math.round(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " m";
  }

  function say(text) {
    document.getElementById("message").textContent = text;
  }

  // A destructive button asks once more on the button itself (no modal dialog).
  function actionButton(label, run) {
    const b = el("button", { type: "button" }, label);
    let armed = null;
    b.addEventListener("click", async () => {
      if (!armed) {
        b.textContent = "sure?";
        armed = setTimeout(() => { armed = null; b.textContent = label; }, 3000);
        return;
      }
      clearTimeout(armed);
      armed = null;
      b.disabled = true;
      try { await run(); } finally { b.textContent = label; }
    });
    return b;
  }

  async function post(path, body) {
    const r = await fetch(path, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Clusterpy-Token": token },
      body: JSON.stringify(body),
    });
    const answer = await r.json().catch(() => ({}));
    say(r.ok ? "done: " + path.split("/").pop() + " " + Object.values(body)[0]
             : "refused (" + r.status + "): " + (answer.error || r.statusText));
  }

  function renderCounts(s) {
    for (const st of STATUSES) document.getElementById("count-" + st).textContent = s.counts[st] || 0;
    document.getElementById("count-submitted").textContent = s.submitted;
  }

  function renderNodes(s) {
    const body = document.querySelector("#nodes tbody");
    const rows = s.nodes.map((n) => {
      const pct = n.cpus ? Math.min(100, (100 * n.busy) / n.cpus) : 0;
      const bar = el("span", { class: "busy" }, el("span"));
      bar.firstChild.style.width = pct + "%";
      const stop = n.state === "connected" || n.state === "lost" || n.state === "connecting"
        ? actionButton("stop using", () => post("/api/stop-node", { node: n.name })) : "";
      return el("tr", { "data-node": n.name, "data-state": n.state },
        el("td", {}, el("span", { class: "state " + n.state }, n.state)),
        el("td", { class: "addr" }, n.name),
        el("td", {}, n.hostname || ""),
        el("td", { class: "num" }, n.cpus),
        el("td", { class: "num" }, bar, String(n.busy)),
        el("td", { class: "num", "data-field": "jobs_done" }, n.jobs_done),
        el("td", { class: "num" }, n.failures),
        el("td", { class: "num" }, duration(n.cpu_time)),
        el("td", { class: "num" }, n.last_pulse == null ? "–" : duration(n.last_pulse) + " ago"),
        el("td", {}, stop));
    });
    body.replaceChildren(...rows);
    const up = s.nodes.filter((n) => n.state === "connected");
    document.getElementById("nodes-summary").textContent =
      up.length + " of " + s.nodes.length + " connected, " + up.reduce((a, n) => a + n.cpus, 0) + " CPUs";
  }

  function renderComputations(s) {
    const panel = document.getElementById("computations-panel");
    panel.hidden = !s.computations.length;
    const rows = s.computations.map((c) => el("tr", { "data-comp": c.comp_id },
      el("td", { class: "addr" }, c.comp_id), el("td", {}, c.client),
      el("td", { class: "num" }, c.counts.Created || 0), el("td", { class: "num" }, c.counts.Running || 0),
      el("td", { class: "num" }, c.counts.Finished || 0),
      el("td", { class: "num" }, (c.counts.Terminated || 0) + (c.counts.Abandoned || 0))));
    document.querySelector("#computations tbody").replaceChildren(...rows);
  }

  function renderRunning(s) {
    const now = s.time;
    const rows = s.running.map((j) => el("tr", { "data-job": j.key },
      el("td", {}, j.id), el("td", { class: "addr" }, j.node || "–"),
      el("td", { class: "num" }, j.started ? duration(Math.max(0, now - j.started)) : "–"),
      el("td", {}, actionButton("cancel", () => post("/api/cancel", { job: j.key })))));
    if (!rows.length) rows.push(el("tr", {}, el("td", { class: "empty", colSpan: 4 }, "No job is running.")));
    document.querySelector("#running tbody").replaceChildren(...rows);
    document.getElementById("running-summary").textContent =
      s.running_total > s.running.length ? "(" + s.running.length + " of " + s.running_total + ")" : "";
  }

  function renderFailures(s) {
    const box = document.getElementById("failures");
    const open = new Set([...box.querySelectorAll("details[open]")].map((d) => d.dataset.job));
    const items = s.failures.map((f) => {
      const d = el("details", { class: "failure", "data-job": f.key },
        el("summary", {}, "job " + f.id + " ", el("b", {}, f.status), " on " + (f.node || "no node") + ": " + (f.error || ""),
          el("span", { class: "when" }, new Date(f.when * 1000).toLocaleTimeString())),
        el("pre", {}, f.traceback || "(no traceback)"));
      d.open = open.has(f.key);
      return d;
    });
    if (!items.length) items.push(el("p", { class: "empty" }, "No failures."));
    box.replaceChildren(...items);
  }

  function niceMax(v) {
    if (v <= 5) return 5;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function drawChart(s) {
    const canvas = document.getElementById("chart");
    const values = s.throughput.values;
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    const left = 40, bottom = 18, top = 8, right = 8;
    const pw = w - left - right, ph = h - top - bottom;
    const max = niceMax(Math.max(...values, 1));
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#6b7585";
    g.strokeStyle = "#e3e7ee";
    g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {  // grid lines and their labels
      const y = top + ph - (ph * i) / 4;
      g.beginPath(); g.moveTo(left, Math.round(y) + 0.5); g.lineTo(left + pw, Math.round(y) + 0.5); g.stroke();
      g.textAlign = "right"; g.textBaseline = "middle";
      g.fillText(String(+(max * i / 4).toFixed(2)), left - 6, y);
    }
    const n = values.length, bw = pw / n;
    g.fillStyle = "#2f6fde";
    values.forEach((v, i) => {
      if (!v) return;
      const bh = (ph * v) / max;
      g.fillRect(left + i * bw + 0.5, top + ph - bh, Math.max(1, bw - 1), bh);
    });
    g.fillStyle = "#6b7585"; g.textBaseline = "top";
    g.textAlign = "left"; g.fillText("-" + n + " s", left, top + ph + 4);
    g.textAlign = "center"; g.fillText("-" + Math.round(n / 2) + " s", left + pw / 2, top + ph + 4);
    g.textAlign = "right"; g.fillText("now", left + pw, top + ph + 4);
    const recent = values.slice(-11, -1);  // the current second is still filling
    const rate = recent.reduce((a, b) => a + b, 0) / Math.max(1, recent.length);
    document.getElementById("rate").textContent = rate.toFixed(1) + " jobs/s over the last 10 s";
  }

  function render(s) {
    last = s;
    document.getElementById("kind").textContent = s.kind === "scheduler" ? "scheduler" : "cluster";
    document.getElementById("name").textContent = s.name;
    document.getElementById("uptime").textContent = "up " + duration(s.uptime) + (s.closing ? " · closing" : "");
    document.title = "clusterpy · " + s.name;
    renderCounts(s);
    renderNodes(s);
    renderComputations(s);
    renderRunning(s);
    renderFailures(s);
    drawChart(s);
    document.body.dataset.updated = String(s.time);
  }

  function connect() {
    const live = document.getElementById("live");
    const source = new EventSource("/api/events");
    source.addEventListener("snapshot", (ev) => {
      live.textContent = "live"; live.classList.remove("off");
      render(JSON.parse(ev.data));
    });
    source.onerror = () => {
      live.textContent = source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…";
      live.classList.add("off");
    };
  }

  window.addEventListener("resize", () => last && drawChart(last));
  connect();
})();
