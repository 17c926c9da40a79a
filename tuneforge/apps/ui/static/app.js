// tuneforge ui: one script for the four pages. Plain DOM, no build step, nothing fetched from
// elsewhere; every figure comes from the server's JSON API, which reads what runs write.
"use strict";

const main = document.getElementById("main");
// The access token the server put in this page: sent with every request, as only this page's own
// script can (a page elsewhere can neither read it nor set the header).
const TOKEN = document.querySelector('meta[name="tuneforge-token"]')?.content || "";

// ---- small helpers ---------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function post(path, body) {
  return fetch(path, { method: "POST", headers: { "Content-Type": "application/json", "X-Tuneforge-Token": TOKEN },
                       body: JSON.stringify(body) });
}

async function api(path, body) {
  const response = body === undefined ? await fetch(path, { headers: { "X-Tuneforge-Token": TOKEN } })
                                      : await post(path, body);
  if (!response.ok) throw await failure(response);
  return response.json();
}

// The error a refused request carries: the API's JSON {error, key}, or the gate's line of text.
async function failure(response) {
  const text = await response.text();
  let data;
  try { data = JSON.parse(text); } catch { data = { error: text.trim() || `${response.status} ${response.statusText}` }; }
  const err = new Error(data.error || response.statusText);
  err.key = data.key; err.status = response.status;
  return err;
}

const int = (n) => (n === null || n === undefined) ? "—" : Number(n).toLocaleString("en-US");
const fixed = (n, d = 4) => (n === null || n === undefined) ? "—" : Number(n).toFixed(d);
function duration(s) {
  if (s === null || s === undefined) return "—";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}
const gib = (g) => g < 1 ? `${(g * 1024).toFixed(0)} MiB` : `${g.toFixed(2)} GiB`;
const statusBadge = (s) => el("span", { class: `status status-${s}`, "data-status": s, text: s });
function bestText(best) {
  if (!best) return "—";
  return `${best[0]} ${fixed(best[1])}`;
}
function showError(box, err) {
  box.textContent = err ? (err.message || String(err)) : "";
  box.hidden = !err;
}

// ---- the chart: a hand-drawn SVG line chart --------------------------------------------------
function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

function drawChart(svg, series, yLabel) {
  const W = 560, H = 260, L = 58, R = 14, T = 14, B = 40;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  const all = series.flatMap((s) => s.points);
  svg.dataset.points = series.length ? series[0].points.length : 0;
  if (!all.length) {
    add("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no points yet");
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) { x1 = x0 + 1; }
  const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.05 || 0.5;
  y0 -= pad; y1 += pad;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (const t of niceTicks(y0, y1)) {
    add("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid" });
    add("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end" }, +t.toPrecision(4));
  }
  for (const t of niceTicks(x0, x1).filter((t) => Number.isInteger(t))) {
    add("text", { x: sx(t), y: H - B + 16, "text-anchor": "middle" }, t);
  }
  add("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" });
  add("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" });
  add("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "step");
  add("text", { x: 12, y: (T + H - B) / 2, "text-anchor": "middle",
                transform: `rotate(-90 12 ${(T + H - B) / 2})` }, yLabel);
  series.forEach((s, i) => {
    if (!s.points.length) return;
    add("polyline", { points: s.points.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "), fill: "none",
                      stroke: s.color, "stroke-width": 1.8 });
    if (s.points.length <= 120 || s.dots) {
      for (const p of s.points) add("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.6, fill: s.color, class: s.name });
    }
    add("rect", { x: W - R - 120, y: T + 4 + i * 16, width: 10, height: 10, fill: s.color });
    add("text", { x: W - R - 104, y: T + 13 + i * 16 }, s.label);
  });
}

// ---- New run -----------------------------------------------------------------------------------
function fieldInput(f, options) {
  const id = `f-${f.key.replace(/\./g, "-")}`;
  let input;
  if (f.key === "model") {
    input = el("select", { id, name: f.key }, options.models.map((m) => el("option", { value: m, text: m })));
    input.value = f.default;
  } else if (f.key === "data.path" || f.key === "data.eval_path") {
    const none = f.key === "data.path" ? "(choose a file)" : "(none: hold out data.val_fraction)";
    input = el("select", { id, name: f.key }, el("option", { value: "", text: none }),
               options.data_files.map((p) => el("option", { value: p, text: p })));
  } else if (f.kind === "bool") {
    input = el("input", { id, name: f.key, type: "checkbox", checked: f.default === "true" });
  } else if (f.kind === "choice") {
    input = el("select", { id, name: f.key },
               f.choices.map((c) => el("option", { value: c, text: c === "" ? "(null)" : c })));
    input.value = f.default;
  } else {
    input = el("input", { id, name: f.key, type: "text", value: f.default, placeholder: f.default === "" ? "null" : null });
  }
  const short = f.key.includes(".") ? f.key.slice(f.key.indexOf(".") + 1) : f.key;
  return el("div", { class: "field" },
            el("label", { for: id }, el("code", { text: short }), el("span", { class: "type", text: f.type })),
            input, f.help ? el("small", { class: "help", text: f.help }) : null);
}

function formValues(form) {
  const values = {};
  for (const input of form.querySelectorAll("[name]")) {
    values[input.name] = input.type === "checkbox" ? String(input.checked) : input.value;
  }
  return values;
}

function stamp() {
  const d = new Date(), p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
}

function estimateFigures(e, values) {
  const noSteps = !values["data.path"] ? "choose a data file, or set train.max_steps"
    : values["data.format"] === "text" ? "raw text is cut into blocks when the run reads it: set train.max_steps to see it"
    : "set train.max_steps";
  const pct = 100 * e.trainable_params / Math.max(e.total_params, 1);
  const rows = [
    ["parameters", `${int(e.trainable_params)} trainable of ${int(e.total_params)} (${pct.toFixed(3)}%)`],
    ["memory", `about ${gib(e.peak_gib)} (` +
               Object.entries(e.parts_gib).map(([k, v]) => `${k} ${gib(v)}`).join(", ") + ")"],
    ["time per step", `${duration(e.seconds_per_step)} for ${int(e.tokens_per_step)} tokens`],
    ["time per run", e.steps ? `${duration(e.run_seconds)} for ${int(e.steps)} steps` +
                     (e.n_examples ? ` (about ${int(e.n_examples)} training examples)` : "")
                     : noSteps],
  ];
  return el("div", {}, el("dl", { class: "figures", id: "estimate" },
            rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { "data-figure": k, text: v })])),
            el("small", { class: "muted", text: "tuneforge estimate's figures with every example taken to fill " +
              "data.max_length, so memory and time are upper bounds (the data is read only to check it and count " +
              "its examples); the run prints its own estimate from the real lengths." }));
}

async function newRunPage() {
  const options = await api("/api/options");
  const s = options.schema;
  const form = el("form", { id: "run-form", autocomplete: "off", onsubmit: (e) => e.preventDefault() });
  const methodSelect = el("select", { id: "f-method-name", name: "method.name" },
                          Object.keys(s.methods).map((m) => el("option", { value: m, text: m })));
  methodSelect.value = Object.keys(s.methods).includes("lora") ? "lora" : Object.keys(s.methods)[0];
  const methodFields = el("div", { id: "method-fields" });
  const renderMethod = () => methodFields.replaceChildren(...s.methods[methodSelect.value].map((f) => fieldInput(f, options)));
  renderMethod();
  const section = (name, open) => el("details", { open, id: `section-${name}` },
                                     el("summary", { text: { data: "Data", train: "Training", eval: "Evaluation" }[name] }),
                                     s.sections[name].map((f) => fieldInput(f, options)));
  form.append(
    el("fieldset", {}, el("legend", { text: "Model" }), s.run.map((f) => fieldInput(f, options))),
    el("fieldset", {}, el("legend", { text: "Method" }),
       el("div", { class: "field" }, el("label", { for: "f-method-name" }, el("code", { text: "name" })), methodSelect,
          el("small", { class: "help", text: s.method_help })),
       methodFields),
    section("data", true), section("train", true), section("eval", false));

  const nameInput = el("input", { type: "text", id: "run-name", value: `${methodSelect.value}-${stamp()}` });
  let nameEdited = false;
  const errorBox = el("p", { class: "error", id: "form-error", hidden: true });
  const estimateBox = el("div", { id: "estimate-box" }, el("p", { class: "muted", text: "…" }));
  const yaml = el("pre", { id: "yaml" });
  const download = el("a", { id: "download", href: "#", text: "Download YAML" });
  const start = el("button", { id: "start", type: "button", text: "Start" });
  const aside = el("aside", {},
    el("div", { class: "card" }, el("h2", { text: "Estimate" }), estimateBox),
    el("div", { class: "card" }, el("h2", { text: "Start" }),
       el("div", { class: "row" }, el("label", { for: "run-name", text: "Run name" }), nameInput, start),
       el("small", { class: "muted", text: `The run writes to ${options.runs_dir}/<run name>; the page launches ` +
                                         "tuneforge train on the config below." }),
       errorBox),
    el("div", { class: "card" }, el("div", { class: "row" }, el("h2", { text: "Resolved config" }), download), yaml));
  main.replaceChildren(el("h1", { text: "New run" }), el("div", { class: "cols" }, form, aside));

  let seq = 0, timer = null;
  const body = () => ({ name: nameInput.value.trim(), form: formValues(form) });
  async function refresh() {
    const mine = ++seq;
    let resolvedOk = false;
    for (const bad of form.querySelectorAll(".invalid")) bad.classList.remove("invalid");
    start.disabled = true;
    try {
      const resolved = await api("/api/resolve", body());
      if (mine !== seq) return;
      resolvedOk = true;
      showError(errorBox, null);
      yaml.classList.remove("stale");
      yaml.textContent = resolved.yaml;
      download.href = URL.createObjectURL(new Blob([resolved.yaml], { type: "text/yaml" }));
      download.download = `${resolved.name}.yaml`;
      start.disabled = false;
      estimateBox.replaceChildren(el("p", { class: "muted", text: "estimating…" }));
      const est = await api("/api/estimate", body());
      if (mine !== seq) return;
      estimateBox.replaceChildren(estimateFigures(est, formValues(form)));
    } catch (err) {
      if (mine !== seq) return;
      showError(errorBox, err);
      const input = err.key && form.querySelector(`[name="${CSS.escape(err.key)}"]`);
      if (input) input.classList.add("invalid");
      // A config that resolved may start even if its estimate failed, unless the error names a field (the
      // data as the run would read it: a missing file, a table without its columns), which Start refuses too.
      start.disabled = !resolvedOk || Boolean(err.key);
      yaml.classList.toggle("stale", !resolvedOk);  // the last config that resolved, dimmed
      estimateBox.replaceChildren(el("p", { class: "muted",
        text: resolvedOk ? "no estimate: see the error" : "no estimate while the form has an error" }));
    }
  }
  const schedule = () => { clearTimeout(timer); timer = setTimeout(refresh, 250); };
  form.addEventListener("input", schedule);
  form.addEventListener("change", schedule);
  methodSelect.addEventListener("change", () => {
    renderMethod();
    if (!nameEdited) nameInput.value = `${methodSelect.value}-${stamp()}`;
  });
  nameInput.addEventListener("input", () => { nameEdited = true; schedule(); });
  start.addEventListener("click", async () => {
    start.disabled = true;
    try {
      const started = await api("/api/start", body());
      location.href = started.url;
    } catch (err) {
      showError(errorBox, err);
      start.disabled = false;
    }
  });
  refresh();
}

// ---- Runs --------------------------------------------------------------------------------------
async function runsPage() {
  const tbody = el("tbody");
  const note = el("p", { class: "error", hidden: true });
  const where = el("p", { class: "muted" });
  main.replaceChildren(el("h1", { text: "Runs" }), where, note,
    el("table", { id: "runs-table" },
       el("thead", {}, el("tr", {}, ["run", "method", "data", "status", "steps", "best", "elapsed"].map((h) => el("th", { text: h })))),
       tbody));
  async function poll() {
    try {
      const data = await api("/api/runs");
      showError(note, null);
      where.textContent = `Every run under ${data.runs_dir}/. A run started elsewhere shows here too.`;
      tbody.replaceChildren(...(data.runs.length ? data.runs.map((r) => el("tr", { "data-run": r.name },
        el("td", {}, el("a", { href: `/runs/${encodeURIComponent(r.name)}`, text: r.name })),
        el("td", { text: r.method || "—" }), el("td", { text: r.data || "—" }),
        el("td", { title: r.detail || "" }, statusBadge(r.status)),
        el("td", { text: r.steps === null || r.steps === undefined ? "—" : `${r.steps}${r.max_steps ? " / " + r.max_steps : ""}` }),
        el("td", { text: bestText(r.best) }), el("td", { text: duration(r.seconds) })))
        : [el("tr", {}, el("td", { colspan: 7, class: "muted", text: "No runs yet: start one on the New run page." }))]));
    } catch (err) { showError(note, err); }
    setTimeout(poll, 2000);
  }
  poll();
}

// ---- One run -----------------------------------------------------------------------------------
// summary.json's keys as the page shows them: [key, label, format]
const SUMMARY_KEYS = [["method", "method", (v) => v], ["trainable_parameters", "trainable parameters", int],
  ["total_parameters", "total parameters", int], ["steps", "steps", int], ["seconds", "training time", duration],
  ["tokens_per_s", "tokens per second", (v) => int(Math.round(v))],
  ["peak_memory_mb", "peak memory", (v) => `${int(Math.round(v))} MB`],
  ["artifact_bytes", "size on disk", (v) => `${(v / 2 ** 20).toFixed(2)} MiB`], ["stopped", "stopped by", (v) => v]];

function summaryTable(summary) {
  const rows = SUMMARY_KEYS.filter(([k]) => summary[k] !== undefined && summary[k] !== null)
    .map(([k, label, f]) => el("tr", {}, el("th", { text: label }), el("td", { text: f(summary[k]) })));
  for (const when of ["before", "after", "best"]) {
    const m = summary[when];
    if (!m) continue;
    const shown = ["accuracy", "macro_f1", "loss", "perplexity", "rewards_accuracy", "rewards_margin"]
      .filter((k) => typeof m[k] === "number")
      .map((k) => `${k} ${fixed(m[k])}`).join(", ");
    const ci = m.accuracy_ci95 ? ` (95% interval ${fixed(m.accuracy_ci95[0])} to ${fixed(m.accuracy_ci95[1])} on ${m.n})` : "";
    rows.push(el("tr", {}, el("th", { text: when }), el("td", { text: shown + ci })));
  }
  return el("table", { id: "summary" }, el("tbody", {}, rows));
}

async function runPage(name) {
  const title = el("h1", {}, name);
  const detail = el("p", { class: "muted", id: "run-detail" });
  const message = el("p", { class: "note", id: "run-message", hidden: true });
  const errorBox = el("p", { class: "error", id: "run-error", hidden: true });
  const stop = el("button", { id: "stop", type: "button", class: "secondary", text: "Stop", disabled: true });
  const resume = el("button", { id: "resume", type: "button", class: "secondary", text: "Resume", disabled: true });
  const tryLink = el("a", { href: `/try?run=${encodeURIComponent(name)}`, text: "Try it", hidden: true });
  const lossChart = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  lossChart.setAttribute("id", "loss-chart"); lossChart.setAttribute("class", "chart");
  const accChart = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  accChart.setAttribute("id", "accuracy-chart"); accChart.setAttribute("class", "chart");
  const accCard = el("div", { class: "card", hidden: true }, el("h2", { text: "Held-out accuracy" }), accChart);
  const rewardChart = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  rewardChart.setAttribute("id", "reward-chart"); rewardChart.setAttribute("class", "chart");
  const rewardCard = el("div", { class: "card", hidden: true }, el("h2", { text: "Rewards" }), rewardChart);
  const summaryBox = el("div", {}, el("p", { class: "muted", text: "written when the run finishes" }));
  const configBox = el("pre", { id: "run-config" });
  const logBox = el("pre", { id: "run-log" });
  main.replaceChildren(title, detail, el("div", { class: "row" }, stop, resume, tryLink), message, errorBox,
    el("div", { class: "charts" }, el("div", { class: "card" }, el("h2", { text: "Loss" }), lossChart), accCard,
       rewardCard),
    el("div", { class: "cols" },
       el("div", {}, el("div", { class: "card" }, el("h2", { text: "Summary" }), summaryBox),
          el("div", { class: "card" }, el("h2", { text: "Log (last lines)" }), logBox)),
       el("div", { class: "card" }, el("h2", { text: "Config" }), configBox)));
  const url = `/api/runs/${encodeURIComponent(name)}`;
  let timer = null, classification = false;
  async function act(button, path) {
    button.disabled = true;
    try { await api(`${url}/${path}`, {}); showError(errorBox, null); } catch (err) { showError(errorBox, err); }
    clearTimeout(timer); poll();
  }
  stop.addEventListener("click", () => act(stop, "stop"));
  resume.addEventListener("click", () => act(resume, "resume"));
  async function poll() {
    let run;
    try {
      run = await api(url);
      classification = run.classification;
      const m = await api(`${url}/metrics`);
      const pts = (key) => m.records.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
      drawChart(lossChart, [{ name: "train", label: "train", color: "#2f6fde", points: pts("loss") },
                            { name: "eval", label: "validation", color: "#e67e22", points: pts("eval_loss"), dots: true }],
                "loss");
      accCard.hidden = !classification;
      drawChart(accChart, [{ name: "eval", label: "accuracy", color: "#1e8449", points: pts("eval_accuracy"), dots: true }],
                "accuracy");
      rewardCard.hidden = !m.records.some((r) => typeof r.rewards_margin === "number");  // a preference objective
      if (!rewardCard.hidden) {
        drawChart(rewardChart, [{ name: "chosen", label: "chosen", color: "#1e8449", points: pts("rewards_chosen") },
                                { name: "rejected", label: "rejected", color: "#c0392b", points: pts("rewards_rejected") },
                                { name: "margin", label: "validation margin", color: "#e67e22",
                                  points: pts("eval_rewards_margin"), dots: true }], "reward");
      }
    } catch (err) {
      showError(errorBox, err);
      if (err.status === 404) {  // the folder went: say so, and stop asking
        title.replaceChildren(name, statusBadge("failed"));
        stop.disabled = resume.disabled = true;
        return;
      }
      timer = setTimeout(poll, 3000);
      return;
    }
    showError(errorBox, null);
    title.replaceChildren(name, statusBadge(run.status));
    detail.textContent = `${run.detail}. Folder ${run.folder}; method ${run.method || "—"}, data ${run.data || "—"}, ` +
      `step ${run.steps ?? "—"}${run.max_steps ? " of " + run.max_steps : ""}, elapsed ${duration(run.seconds)}.`;
    const notes = [];
    if (run.dropped) notes.push(`metrics.jsonl: ${run.dropped} torn or malformed line(s) skipped`);
    if (!run.launched_here) notes.push("This run was not started from this page, so its log is not here.");
    if (run.stop_note) notes.push(`Stop: ${run.stop_note}.`);
    message.textContent = notes.join(" ");
    message.hidden = !notes.length;
    stop.disabled = !run.stoppable;  // only a run a page started, that very process: another is stopped where it runs
    stop.title = run.stop_note || "";
    resume.disabled = run.status !== "interrupted";
    tryLink.hidden = !run.has_result || run.status === "running";
    if (run.summary) summaryBox.replaceChildren(summaryTable(run.summary));
    configBox.textContent = run.config || "(no config.yaml)";
    logBox.textContent = run.log || "(no log)";
    timer = setTimeout(poll, run.status === "running" ? 1000 : 3000);
  }
  poll();
}

// ---- Compare -----------------------------------------------------------------------------------
async function comparePage() {
  const list = el("div", { id: "compare-runs" });
  const button = el("button", { id: "compare", type: "button", text: "Compare" });
  const errorBox = el("p", { class: "error", hidden: true });
  const result = el("div", { id: "compare-result" });
  main.replaceChildren(el("h1", { text: "Compare" }),
    el("p", { class: "muted", text: "The table and chart tuneforge compare writes, from the finished runs' summaries " +
                                    "(held-out accuracy, trainable parameters, peak memory, time, size on disk)." }),
    el("div", { class: "card" }, list, el("div", { class: "row" }, button)), errorBox, result);
  const data = await api("/api/runs");
  const finished = data.runs.filter((r) => r.status === "finished");
  list.replaceChildren(...(finished.length ? finished.map((r) => el("label", { class: "row" },
      el("input", { type: "checkbox", value: r.name, name: "run" }), `${r.name} (${r.method || "?"}, ${bestText(r.best)})`))
    : [el("p", { class: "muted", text: "No finished runs yet." })]));
  button.addEventListener("click", async () => {
    const names = [...list.querySelectorAll("input:checked")].map((i) => i.value);
    button.disabled = true;
    try {
      const c = await api("/api/compare", { runs: names });
      showError(errorBox, null);
      result.replaceChildren(
        el("div", { class: "card" }, el("table", { id: "compare-table" },
          el("thead", {}, el("tr", {}, c.columns.map((h) => el("th", { text: h.replace(/_/g, " ") })))),
          el("tbody", {}, c.rows.map((row) => el("tr", {}, row.map((cell) => el("td", { text: cell }))))))),
        el("div", { class: "card" }, el("img", { id: "compare-chart", class: "chart", src: c.chart,
                                                 alt: "held-out accuracy against trainable parameters" })),
        c.skipped.length ? el("p", { class: "note", text: `Not finished, left out: ${c.skipped.join(", ")}` }) : "");
    } catch (err) { showError(errorBox, err); }
    button.disabled = false;
  });
}

// ---- Try ---------------------------------------------------------------------------------------
async function tryPage() {
  const select = el("select", { id: "try-run" });
  const errorBox = el("p", { class: "error", hidden: true, id: "try-error" });
  const panels = el("div", { id: "try-panels" });
  main.replaceChildren(el("h1", { text: "Try" }),
    el("div", { class: "card" }, el("div", { class: "row" }, el("label", { for: "try-run", text: "Run" }), select)),
    errorBox, panels);
  const data = await api("/api/runs");
  const ready = data.runs.filter((r) => r.has_result && r.status !== "running");
  select.replaceChildren(el("option", { value: "", text: ready.length ? "(choose a run)" : "(no finished runs yet)" }),
                         ...ready.map((r) => el("option", { value: r.name, text: `${r.name} (${r.method || "?"})` })));
  const wanted = new URLSearchParams(location.search).get("run");
  if (wanted && ready.some((r) => r.name === wanted)) select.value = wanted;

  async function load() {
    panels.replaceChildren();
    showError(errorBox, null);
    if (!select.value) return;
    const name = select.value, base = `/api/try/${encodeURIComponent(name)}`;
    panels.append(el("p", { class: "muted", text: "loading the model and the run's result…" }));
    let info;
    try { info = await api(base, {}); } catch (err) { panels.replaceChildren(); showError(errorBox, err); return; }
    panels.replaceChildren();
    if (info.generates) {
      const system = el("textarea", { id: "try-system", rows: 2 });
      system.value = info.system || "";
      const prompt = el("textarea", { id: "try-prompt", rows: 3 });
      prompt.value = info.prompt_prefix;
      const maxNew = el("input", { id: "try-max-new", type: "number", value: 64, min: 1, max: 2048 });
      const go = el("button", { id: "try-generate", type: "button", text: "Generate" });
      const out = el("pre", { id: "try-output" });
      go.addEventListener("click", async () => {
        go.disabled = true; out.textContent = ""; out.dataset.done = "";
        try {
          const response = await post(`${base}/generate`,
            { text: prompt.value, system: system.value, max_new_tokens: Number(maxNew.value) });
          if (!response.ok) throw await failure(response);
          const reader = response.body.getReader(), decoder = new TextDecoder();
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            out.textContent += decoder.decode(value, { stream: true });
          }
          showError(errorBox, null);
        } catch (err) { showError(errorBox, err); }
        out.dataset.done = "1";
        go.disabled = false;
      });
      panels.append(el("div", { class: "card" }, el("h2", { text: "Generate" }),
        el("div", { class: "field" }, el("label", { for: "try-system" }, el("code", { text: "system" })), system,
           el("small", { class: "help", text: "the system message; empty: the chat template's own" })),
        el("div", { class: "field" }, el("label", { for: "try-prompt" }, el("code", { text: "prompt" })), prompt),
        el("div", { class: "field" }, el("label", { for: "try-max-new" }, el("code", { text: "max new tokens" })), maxNew),
        el("div", { class: "row" }, go), out));
    }
    if (info.labels) {
      const text = el("textarea", { id: "try-text", rows: 3, placeholder: "a text to label" });
      const go = el("button", { id: "try-classify", type: "button", text: "Label it" });
      const bars = el("div", { id: "try-labels" });
      go.addEventListener("click", async () => {
        go.disabled = true;
        try {
          const r = await api(`${base}/classify`, { text: text.value });
          showError(errorBox, null);
          bars.replaceChildren(...r.labels.map((l) => el("div", { class: "bar", "data-label": l.label },
            el("span", { text: l.label === l.word ? l.label : `${l.label} (${l.word})` }),
            el("div", { class: "track" }, el("div", { class: "fill", style: `width: ${(100 * l.p).toFixed(1)}%` })),
            el("span", { text: `${(100 * l.p).toFixed(1)}%` }))));
        } catch (err) { showError(errorBox, err); }
        go.disabled = false;
      });
      panels.append(el("div", { class: "card" }, el("h2", { text: "Label a text" }),
        el("p", { class: "muted", text: "Each label's probability, scored as the run's evaluation scores it." }),
        text, el("div", { class: "row" }, go), bars));
    }
  }
  select.addEventListener("change", load);
  load();
}

// ---- routing -----------------------------------------------------------------------------------
(async function route() {
  const path = location.pathname.replace(/\/+$/, "") || "/";
  const page = path.startsWith("/runs/") ? "runs" : { "/": "new", "/runs": "runs", "/compare": "compare", "/try": "try" }[path];
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  try {
    if (path.startsWith("/runs/")) await runPage(decodeURIComponent(path.slice(6)));
    else if (page === "new") await newRunPage();
    else if (page === "runs") await runsPage();
    else if (page === "compare") await comparePage();
    else if (page === "try") await tryPage();
    else main.replaceChildren(el("p", { class: "error", text: "no such page" }));
  } catch (err) {
    main.replaceChildren(el("p", { class: "error", text: err.message || String(err) }));
  }
})();
