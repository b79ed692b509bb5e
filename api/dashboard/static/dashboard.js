// quantfoundry dashboard: live updates over server-sent events and calls to the REST API.
// Plain JavaScript, no build step. The token travels in the HttpOnly qf_token cookie.
"use strict";

const PREFIX = "/dashboard";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

function fmtDuration(s) {
  s = Math.max(0, Math.round(s));
  if (s >= 3600) return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${s}s`;
}

function setProgress(container, p) {
  const bar = container.querySelector(".progress");
  if (!bar) return;
  const pct = p.total > 0 ? Math.min(100, Math.round((100 * p.done) / p.total)) : 0;
  bar.setAttribute("aria-valuenow", pct);
  bar.querySelector(".bar").style.width = `${pct}%`;
  bar.querySelector(".label").textContent =
    `${p.phase || ""}${p.total ? ` ${p.done}/${p.total}` : ""}`;
}

// An HTML fragment from the server as a DOM node (the first element), or null.
async function fragment(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (r.redirected && r.url.includes(`${PREFIX}/login`)) {
    window.location = r.url; // the token expired or was revoked
    return null;
  }
  if (r.status !== 200) return null;
  const t = document.createElement("template");
  t.innerHTML = (await r.text()).trim();
  return t.content.firstElementChild;
}

// ---- jobs list: every visible job's events on one stream -----------------------------------
function jobsPage() {
  const table = document.getElementById("jobs");
  const tbody = table.querySelector("tbody");
  const filters = table.dataset.filters;
  const live = document.getElementById("live");
  const refreshing = new Map();

  async function refreshRow(jobId) {
    // One fetch at a time per job; a change that arrives meanwhile is fetched once more after.
    if (refreshing.has(jobId)) {
      refreshing.set(jobId, true);
      return;
    }
    refreshing.set(jobId, false);
    try {
      const row = await fragment(`${PREFIX}/rows/${jobId}?${filters}`);
      const old = document.getElementById(`job-${jobId}`);
      if (!row) old?.remove();
      else if (old) old.replaceWith(row);
      else tbody.prepend(row);
      document.getElementById("no-jobs").hidden = tbody.children.length > 0;
    } finally {
      const again = refreshing.get(jobId);
      refreshing.delete(jobId);
      if (again) refreshRow(jobId);
    }
  }

  const source = new EventSource(`${PREFIX}/stream?after=${table.dataset.after}`);
  source.onopen = () => live.classList.add("on");
  source.onerror = () => live.classList.remove("on");
  source.addEventListener("job", (msg) => {
    const e = JSON.parse(msg.data);
    const row = document.getElementById(`job-${e.job_id}`);
    if (e.kind === "progress" && row) setProgress(row, e);
    else if (e.kind === "state" || !row) refreshRow(e.job_id);
  });
}

// ---- one job: its own event stream, cancel and retry ---------------------------------------
function jobPage() {
  const panel = document.getElementById("job-panel");
  const jobId = panel.dataset.job;
  let source = null;

  function appendLog(id, line) {
    const log = document.getElementById("log");
    const span = document.createElement("span");
    span.dataset.id = id;
    span.textContent = `${new Date().toTimeString().slice(0, 8)} ${line}\n`;
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(span);
    if (atEnd) log.scrollTop = log.scrollHeight; // follow the tail unless scrolled up
  }

  function scrollLog() {
    const log = document.getElementById("log");
    log.scrollTop = log.scrollHeight;
  }

  async function reloadPanel() {
    const fresh = await fragment(`${PREFIX}/jobs/${jobId}/panel`);
    if (!fresh) return;
    document.getElementById("job-state").replaceWith(fresh);
    scrollLog();
    wireActions();
    listen();
  }

  function listen() {
    const state = document.getElementById("job-state");
    if (source || state.dataset.terminal === "yes") return;
    // The API's stream ends after the final state; close it then, or EventSource reconnects.
    source = new EventSource(`/v1/jobs/${jobId}/events?after=${state.dataset.after}`);
    source.addEventListener("progress", (msg) => {
      const p = JSON.parse(msg.data);
      setProgress(document.getElementById("progress") || document.body, p);
      const m = document.getElementById("progress-message");
      if (m) m.textContent = p.message || "";
      const eta = document.getElementById("eta");
      if (eta) eta.textContent = p.eta_s != null ? `about ${fmtDuration(p.eta_s)} left` : "";
      appendLog(msg.lastEventId, `[${p.phase}] ${p.message || ""}${p.total ? ` (${p.done}/${p.total})` : ""}`);
    });
    source.addEventListener("state", (msg) => {
      const s = JSON.parse(msg.data);
      if (TERMINAL.has(s.state)) {
        source.close();
        source = null;
      }
      reloadPanel();
    });
  }

  function wireActions() {
    for (const button of document.querySelectorAll("[data-action]")) {
      button.addEventListener("click", async () => {
        const error = document.getElementById("action-error");
        error.textContent = "";
        button.disabled = true;
        const r = await fetch(`/v1/jobs/${jobId}/${button.dataset.action}`, {
          method: "POST",
          credentials: "same-origin",
        });
        if (!r.ok) {
          const body = await r.json().catch(() => ({}));
          error.textContent = body.message || body.detail || `${r.status} ${r.statusText}`;
          button.disabled = false;
          return;
        }
        if (source) source.close();
        source = null;
        await reloadPanel();
      });
    }
  }

  scrollLog();
  wireActions();
  listen();
}

// ---- submit: the form as a JobSpec, the API's 422 messages next to their fields ------------
function readValue(el) {
  const type = el.dataset.type;
  if (type === "bool") return el.checked;
  const raw = el.value.trim();
  if (raw === "") return undefined; // the API's default
  if (type === "int" || type === "float") {
    const n = Number(raw);
    // Anything that is not a number goes as typed, for the API to name what is wrong.
    return Number.isFinite(n) ? n : raw;
  }
  if (type === "lines") return raw.split(/\n+/).map((s) => s.trim()).filter(Boolean);
  if (type === "kv") {
    const out = {};
    for (const line of raw.split(/\n+/)) {
      if (!line.trim()) continue;
      const i = line.indexOf("=");
      out[(i < 0 ? line : line.slice(0, i)).trim()] = i < 0 ? "" : line.slice(i + 1).trim();
    }
    return out;
  }
  return raw;
}

function specOf(form) {
  const spec = {};
  for (const el of form.querySelectorAll("[name]")) {
    const value = readValue(el);
    if (value === undefined) continue;
    const path = el.name.split(".");
    let node = spec;
    for (const key of path.slice(0, -1)) node = node[key] ??= {};
    node[path[path.length - 1]] = value;
  }
  // An empty textarea means an empty list ("keep nothing in floating point").
  if (form.elements.ignore && form.elements.ignore.value.trim() === "") spec.ignore = [];
  return spec;
}

function showErrors(form, body) {
  const placed = new Set();
  for (const d of body.detail || []) {
    const path = (d.loc || []).filter((p) => p !== "body").map(String);
    const text = `${path.length ? `${path.join(".")}: ` : ""}${String(d.msg || "").replace(/^Value error, /, "")}`;
    // The field the message names, else its nearest enclosing group, else the form.
    let target = null;
    for (let n = path.length; n >= 0 && !target; n--) {
      target = form.querySelector(`[data-error-for="${CSS.escape(path.slice(0, n).join("."))}"]`);
    }
    const lines = placed.has(target) ? `${target.textContent}\n${text}` : text;
    target.textContent = lines;
    target.hidden = false;
    target.closest(".field")?.classList.add("invalid");
    placed.add(target);
  }
  const top = document.getElementById("form-error");
  if (!placed.has(top)) {
    // Every message sits at its field; the top line only points there.
    const n = placed.size;
    top.textContent = n
      ? `The API refused the job: ${n} field${n === 1 ? "" : "s"} to fix, marked below.`
      : body.message || "The API refused the job.";
    top.hidden = false;
  }
}

function submitPage() {
  const form = document.getElementById("submit-form");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    for (const e of form.querySelectorAll("[data-error-for]")) {
      e.hidden = true;
      e.textContent = "";
    }
    for (const e of form.querySelectorAll(".invalid")) e.classList.remove("invalid");
    const button = document.getElementById("submit");
    button.disabled = true;
    try {
      const r = await fetch("/v1/jobs", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(specOf(form)),
      });
      const body = await r.json().catch(() => ({}));
      if (r.status === 201) {
        window.location = `${PREFIX}/jobs/${body.id}`;
        return;
      }
      if (r.status === 422 && Array.isArray(body.detail)) showErrors(form, body);
      else showErrors(form, { message: body.message || body.detail || `${r.status} ${r.statusText}` });
    } finally {
      button.disabled = false;
    }
  });
}

const PAGES = { jobs: jobsPage, job: jobPage, submit: submitPage };
document.addEventListener("DOMContentLoaded", () => PAGES[document.body.dataset.page]?.());
