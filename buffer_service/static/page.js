// The operator page: reads the admin JSON API every REFRESH_MS and lays it out. Every figure
// comes from the server (ops.py); this file only formats it, counts deadlines down between
// refreshes and sends the operator's actions with the session's CSRF token.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const REFRESH_MS = 2000;
const HOUR_MS = 3600000;
const seen = {};  // section -> signature of the data it shows, so unchanged sections keep their DOM

// -- helpers ------------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    // Through the CSSOM: the Content Security Policy refuses style attributes.
    else if (key === "style") Object.assign(el.style, value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      el.append(child instanceof Node ? child : String(child));
    }
  }
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, value);
  for (const child of children) el.append(child instanceof Node ? child : String(child));
  return el;
}

function ms(iso) { return iso ? Date.parse(iso) : null; }

function clock(iso) { return iso ? iso.slice(11, 19) : "–"; }

function duration(msValue) {
  if (msValue === null || msValue === undefined || Number.isNaN(msValue)) return "–";
  const abs = Math.abs(msValue);
  if (abs < 1000) return `${Math.round(msValue)} ms`;
  if (abs < 60000) return `${(msValue / 1000).toFixed(1)} s`;
  if (abs < HOUR_MS) return `${Math.floor(abs / 60000)} min ${Math.round((abs % 60000) / 1000)} s`;
  return `${(abs / HOUR_MS).toFixed(1)} h`;
}

function number(value, digits = 0) {
  if (value === null || value === undefined) return "–";
  return Number(value).toLocaleString("en", { maximumFractionDigits: digits });
}

function toast(text, bad = false) {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.className = bad ? "show bad" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.className = ""; }, 3500);
}

async function api(method, path, body) {
  const options = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (method !== "GET") options.headers["X-CSRF-Token"] = CSRF;
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(`/admin${path}`, options);
  if (response.status === 401) {  // the session ended: the page itself shows the sign-in form
    window.location.reload();
    throw new Error("signed out");
  }
  const data = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error((data && data.error) || `HTTP ${response.status}`);
  return data;
}

async function act(button, label, call) {
  button.disabled = true;
  try {
    await call();
    toast(label);
    await refresh();
  } catch (error) {
    toast(error.message, true);
  } finally {
    button.disabled = false;
  }
}

// Re-render a section only when `key` (its data, by default) changed since the last refresh.
function section(id, data, render, key = data) {
  const signature = JSON.stringify(key);
  if (seen[id] === signature) return;
  seen[id] = signature;
  document.getElementById(id).replaceChildren(...[render(data)].flat());
}

function empty(text) { return h("p", { class: "empty" }, text); }

// -- key figures --------------------------------------------------------------------------------
function kpis(stats) {
  const t = stats.totals;
  const tile = (label, value, note, tone) => h("div", { class: `kpi ${tone || ""}` },
    h("span", { class: "kpi-label" }, label), h("strong", {}, value), h("span", { class: "kpi-note" }, note));
  const processing = stats.flags.processing === "on";
  return [
    tile("Processing", processing ? "On" : "Off", processing ? "workers answer bursts" : "buffering only",
      processing ? "good" : "bad"),
    tile("Open buffers", number(stats.active.buffering), `${number(stats.active.processing)} in flight`),
    tile("Failed jobs", number(stats.active.failed), "waiting for a retry", stats.active.failed ? "bad" : ""),
    tile("Replies", number(t.completed), `${number(t.bursts)} bursts · 24 h`),
    tile("LLM calls saved", number(t.llm_calls_saved), `${number(t.messages)} messages · 24 h`, "accent"),
    tile("First message → reply", t.avg_first_message_to_reply_s === null ? "–"
      : `${number(t.avg_first_message_to_reply_s, 1)} s`, "average · 24 h"),
  ];
}

// -- open buffers -------------------------------------------------------------------------------
function buffers(rows) {
  document.getElementById("buffers-count").textContent = rows.length;
  if (!rows.length) return empty("No conversation is waiting for a reply.");
  return rows.map((row) => {
    const span = ms(row.deadline_at) - ms(row.first_message_at);
    const countdown = h("span", {
      class: "countdown", "data-due-at": row.due_in_ms === null ? "" : Date.now() + row.due_in_ms,
      "data-window": span || 1,
    });
    const flush = h("button", { class: "small", type: "button", "data-conversation": row.conversation },
      "Flush now");
    flush.addEventListener("click", () => act(flush, `Flushed ${row.conversation}`,
      () => api("POST", `/buffers/${encodeURIComponent(row.conversation)}/flush`)));
    return h("div", { class: "row buffer", "data-conversation": row.conversation },
      h("div", { class: "row-main" },
        h("strong", { class: "mono" }, row.conversation),
        h("span", { class: "muted" }, `${row.messages} message${row.messages === 1 ? "" : "s"}`),
        row.status === "waiting"
          ? h("span", { class: "badge" }, `waits for ${row.batch_in_flight}`) : null),
      h("div", { class: "row-side" },
        row.status === "waiting" ? h("span", { class: "muted" }, "after the batch in flight") : countdown,
        flush),
      h("div", { class: "progress" }, h("span", {})));
  });
}

function tick() {
  const now = Date.now();
  for (const el of document.querySelectorAll(".countdown[data-due-at]")) {
    if (!el.dataset.dueAt) continue;
    const left = Number(el.dataset.dueAt) - now;
    el.textContent = left > 0 ? `flush in ${(left / 1000).toFixed(1)} s` : "flushing…";
    el.classList.toggle("due", left <= 0);
    const bar = el.closest(".row").querySelector(".progress span");
    if (bar) bar.style.width = `${Math.max(0, Math.min(100, 100 * left / Number(el.dataset.window)))}%`;
  }
}

// -- failed jobs --------------------------------------------------------------------------------
function failed(data) {
  const { jobs, total } = data;
  const retryAll = document.getElementById("retry-all");
  retryAll.hidden = total === 0;
  if (!jobs.length) return empty("No failed jobs.");
  const rows = jobs.map((job) => {
    const retry = h("button", { class: "small", type: "button", "data-job": job.id }, "Retry");
    retry.addEventListener("click", () => act(retry, `Job ${job.id} queued again`,
      () => api("POST", `/jobs/${encodeURIComponent(job.id)}/retry`)));
    return h("div", { class: "row failed-job", "data-job": job.id },
      h("div", { class: "row-main" },
        h("strong", { class: "mono" }, job.conversation),
        h("span", { class: "muted" }, `job ${job.id} · ${job.messages} msg · ${job.attempts} attempt${job.attempts === 1 ? "" : "s"} · ${clock(job.processed_at)} UTC`)),
      h("div", { class: "row-side" }, retry),
      h("p", { class: "error" }, job.error || "no error recorded"));
  });
  if (total > jobs.length) rows.push(h("p", { class: "muted" }, `and ${total - jobs.length} more`));
  return rows;
}

// -- switches -----------------------------------------------------------------------------------
function switches(flags) {
  const ordered = [...flags].sort((a, b) => (b.name === "processing") - (a.name === "processing"));
  return ordered.map((flag) => {
    const words = flag.name.replace(/_/g, " ");
    const label = words[0].toUpperCase() + words.slice(1);
    const text = h("div", { class: "flag-text" }, h("strong", {}, label),
      h("span", { class: "muted" }, flag.description));
    if (flag.kind === "bool") {
      const on = flag.value === "on";
      const toggle = h("button", {
        class: "switch", type: "button", role: "switch", "aria-checked": String(on),
        "aria-label": label, "data-flag": flag.name,
      }, h("span", {}));
      toggle.addEventListener("click", () => {
        const next = on ? "off" : "on";
        if (flag.name === "processing" && next === "off"
            && !window.confirm("Switch processing off? Messages are still buffered, but nothing is answered until it is on again.")) {
          return;
        }
        act(toggle, `${label}: ${next}`, () => (flag.name === "processing"
          ? api("POST", `/processing/${next}`) : api("PUT", `/flags/${flag.name}`, { value: next })));
      });
      return h("div", { class: `flag toggle ${flag.name === "processing" ? "main-switch" : ""}` }, text, toggle);
    }
    const input = h("input", {
      value: flag.value, "aria-label": label, "data-flag": flag.name,
      placeholder: flag.kind === "ids" ? "all inboxes" : "",
      inputmode: flag.kind === "percent" ? "numeric" : "text",
    });
    const save = h("button", { class: "small", type: "button" }, "Save");
    save.addEventListener("click", () => act(save, `${label}: ${input.value || "(all)"}`,
      () => api("PUT", `/flags/${flag.name}`, { value: input.value.trim() })));
    return h("div", { class: "flag" }, text,
      h("div", { class: "flag-edit" }, input, flag.kind === "percent" ? h("span", {}, "%") : null, save));
  });
}

// -- timeline of recent bursts ------------------------------------------------------------------
const MIN_STEP_PCT = 2;
const STEP_CLASS = { buffer: "seg-buffer", wait: "seg-wait", llm: "seg-llm", post: "seg-post", fail: "seg-fail" };

function steps(job, now) {
  const first = ms(job.first_message_at);
  const deadline = ms(job.deadline_at);
  const claimed = ms(job.claimed_at);
  const posting = ms(job.posting_at);
  const done = ms(job.processed_at);
  const end = done || now;
  const out = [];
  const add = (kind, from, to) => { if (from !== null && to !== null && to > from) out.push({ kind, from, to }); };
  add("buffer", first, Math.min(deadline, claimed || end));
  add("wait", deadline, claimed || end);
  const bad = job.status === "failed";
  if (claimed !== null) {
    add(bad && !posting ? "fail" : "llm", claimed, posting || end);
    if (posting !== null) add(bad ? "fail" : "post", posting, end);
  }
  return { out, first, end };
}

function timeline(data) {
  const { jobs, now } = data;
  if (!jobs.length) return empty("No bursts yet.");
  return jobs.map((job) => {
    const { out, first, end } = steps(job, now);
    // Steps follow each other; a short one (the LLM, the post) gets a visible minimum width next
    // to a long buffering window. The times written below the bar are exact.
    const widths = out.map((step) => Math.max(MIN_STEP_PCT, (100 * (step.to - step.from)) / Math.max(1, end - first)));
    const scale = 100 / Math.max(100, widths.reduce((sum, w) => sum + w, 0));
    let left = 0;
    const bar = h("div", { class: "bar" }, out.map((step, i) => {
      const span = h("span", {
        class: STEP_CLASS[step.kind], title: `${step.kind}: ${duration(step.to - step.from)}`,
        style: { left: `${left}%`, width: `${widths[i] * scale}%` },
      });
      left += widths[i] * scale;
      return span;
    }));
    const claimed = ms(job.claimed_at);
    const posting = ms(job.posting_at);
    const done = ms(job.processed_at);
    const stepText = (label, iso, delta) => h("li", {}, h("span", { class: "muted" }, label), ` ${clock(iso)}`,
      delta === null ? null : h("span", { class: "delta" }, ` +${duration(delta)}`));
    const finalLabel = { completed: "posted", failed: "failed", skipped: "skipped", superseded: "superseded" }[job.status];
    return h("div", { class: `burst status-${job.status}`, "data-job": job.id },
      h("div", { class: "burst-head" },
        h("span", { class: `badge ${job.status}` }, job.status),
        h("strong", { class: "mono" }, job.conversation),
        h("span", { class: "muted" }, `${job.messages} msg · ${job.trigger} · job ${job.id}`),
        h("span", { class: "burst-total" }, done ? duration(done - first) : "running")),
      bar,
      h("ol", { class: "steps" },
        stepText("in", job.first_message_at, null),
        job.deadline_at ? stepText("deadline", job.deadline_at, ms(job.deadline_at) - first) : null,
        // After the deadline: how late; before it (size, age or manual trigger): no delay to show.
        claimed ? stepText("claimed", job.claimed_at,
          claimed >= ms(job.deadline_at) ? claimed - ms(job.deadline_at) : null) : null,
        posting ? stepText("LLM", job.posting_at, posting - claimed) : null,
        done && finalLabel ? stepText(finalLabel, job.processed_at, done - (posting || claimed || first)) : null),
      job.reason ? h("p", { class: "muted small-text" }, `reason: ${job.reason}`) : null,
      job.error && job.status !== "completed" ? h("p", { class: "error" }, job.error) : null);
  });
}

// -- hourly plots -------------------------------------------------------------------------------
function hourSlots(stats) {
  const current = Math.floor(Date.parse(stats.at) / HOUR_MS) * HOUR_MS;
  const byHour = new Map(stats.hourly.map((row) => [row.hour, row]));
  const slots = [];
  for (let i = stats.hours - 1; i >= 0; i -= 1) {
    const hour = new Date(current - i * HOUR_MS).toISOString();
    slots.push({ hour, row: byHour.get(hour) || null });
  }
  return slots;
}

function chart(title, note, headline, slots, series, unit) {
  const width = 260;
  const height = 120;
  const pad = { left: 28, right: 4, top: 8, bottom: 18 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const stackOf = (slot) => series.reduce((sum, one) => sum + ((slot.row && slot.row[one.key]) || 0), 0);
  const max = Math.max(1, ...slots.map(stackOf));
  const step = plotW / slots.length;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title, class: "plot" });
  for (const fraction of [0, 0.5, 1]) {
    const y = pad.top + plotH * (1 - fraction);
    svg.append(s("line", { x1: pad.left, x2: width - pad.right, y1: y, y2: y, class: "grid" }));
    svg.append(s("text", { x: pad.left - 4, y: y + 3, "text-anchor": "end", class: "axis" },
      number(max * fraction, max < 10 ? 1 : 0)));
  }
  slots.forEach((slot, i) => {
    let base = pad.top + plotH;
    for (const one of series) {
      const value = (slot.row && slot.row[one.key]) || 0;
      if (!value) continue;
      const barH = (plotH * value) / max;
      base -= barH;
      svg.append(s("rect", {
        x: pad.left + i * step + step * 0.15, y: base, width: step * 0.7, height: barH,
        rx: 1.5, class: one.cls,
      }, s("title", {}, `${slot.hour.slice(11, 16)} UTC · ${one.label}: ${number(value, 2)}${unit}`)));
    }
    const last = i === slots.length - 1;
    if (last || (i % 6 === 0 && slots.length - 1 - i >= 4)) {
      svg.append(s("text", {
        x: pad.left + i * step + (last ? step : step / 2), y: height - 4,
        "text-anchor": last ? "end" : "middle", class: "axis",
      }, slot.hour.slice(11, 16)));
    }
  });
  const legend = series.length > 1 ? h("div", { class: "legend" },
    series.map((one) => h("span", {}, h("i", { class: one.cls }), one.label))) : null;
  return h("figure", { class: "chart" },
    h("figcaption", {}, h("span", { class: "chart-title" }, title), h("strong", {}, headline)),
    h("div", { class: "chart-note" }, note), svg, legend);
}

function charts(stats) {
  const slots = hourSlots(stats);
  const t = stats.totals;
  return [
    chart("Flush lateness", "deadline → claim, ms, average", t.avg_deadline_to_claim_ms === null ? "–"
      : `${number(t.avg_deadline_to_claim_ms)} ms`, slots,
      [{ key: "avg_deadline_to_claim_ms", cls: "fill-wait", label: "average" }], " ms"),
    chart("Messages per burst", "average", t.avg_messages_per_burst === null ? "–"
      : number(t.avg_messages_per_burst, 2), slots,
      [{ key: "avg_messages_per_burst", cls: "fill-buffer", label: "average" }], ""),
    chart("Replies and failures", "bursts answered, bursts failed", `${number(t.completed)} / ${number(t.failed)}`,
      slots, [{ key: "completed", cls: "fill-post", label: "replies" },
        { key: "failed", cls: "fill-fail", label: "failures" }], ""),
    chart("LLM calls saved", "messages minus bursts", number(t.llm_calls_saved), slots,
      [{ key: "llm_calls_saved", cls: "fill-llm", label: "saved" }], ""),
  ];
}

// -- refresh loop -------------------------------------------------------------------------------
let refreshing = null;

async function load() {
  const [stats, bufferRows, jobs, flags] = await Promise.all([
    api("GET", "/stats?hours=24"), api("GET", "/buffers?limit=50"), api("GET", "/jobs?limit=12"),
    api("GET", "/flags"),
  ]);
  section("kpis", stats, kpis);
  // A buffer's countdown runs between refreshes; its row changes only with its deadline.
  section("buffers", bufferRows, buffers, bufferRows.map(({ due_in_ms: _, ...rest }) => rest));
  section("failed", { jobs: stats.recent_failed_jobs, total: stats.active.failed }, failed);
  section("switches", flags, switches);
  section("timeline", { jobs, now: Date.parse(stats.at) }, timeline);
  section("charts", stats, charts, [stats.hourly, stats.totals, stats.at.slice(0, 13)]);
  document.getElementById("updated").textContent = `updated ${clock(stats.at)} UTC`;
  document.getElementById("live").className = "dot live";
  tick();
}

function refresh() {
  refreshing = refreshing || load().catch((error) => {
    document.getElementById("updated").textContent = `not updated: ${error.message}`;
    document.getElementById("live").className = "dot stale";
  }).finally(() => { refreshing = null; });
  return refreshing;
}

document.getElementById("retry-all").addEventListener("click", (event) =>
  act(event.currentTarget, "Every failed job queued again", () => api("POST", "/jobs/retry-failed")));
document.getElementById("sign-out").addEventListener("click", async () => {
  await api("DELETE", "/session").catch(() => null);
  window.location.reload();
});

refresh();
// A tab in the background asks nothing; it catches up as soon as it is shown again.
setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
setInterval(tick, 100);
