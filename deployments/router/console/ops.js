// The operations view: GET /v1/ops/status sampled every few seconds, drawn as
// time series per model (queue and running work per tier, decisions per second,
// wait estimates, replicas against their autoscaling limits), and the limits form
// (POST /v1/ops/limits, checked and audited by the server like `mediagate scale set`).
"use strict";

const SAMPLE_S = 2;
const KEEP_S = 300;
const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#ae3ec9", "#e67700", "#0c8599", "#c92a2a"];
const samples = []; // [{at, status}]

function tiersOf(figures) {
  return Object.keys(figures || {}).sort();
}

function sumValues(figures) {
  return Object.values(figures || {}).reduce((total, value) => total + Number(value || 0), 0);
}

// Series for one plot: name -> [[seconds ago, value]].
function seriesOf(model, pick) {
  const series = new Map();
  for (let index = 0; index < samples.length; index++) {
    const sample = samples[index];
    const figures = sample.status.models[model];
    if (!figures || figures.error) continue;
    const previous = index > 0 ? samples[index - 1] : null;
    for (const [name, value] of pick(figures, sample, previous)) {
      if (!series.has(name)) series.set(name, []);
      series.get(name).push([sample.at, value]);
    }
  }
  return series;
}

function draw(canvas, series, unit) {
  const context = canvas.getContext("2d");
  const width = (canvas.width = canvas.clientWidth * devicePixelRatio);
  const height = (canvas.height = canvas.clientHeight * devicePixelRatio);
  context.scale(devicePixelRatio, devicePixelRatio);
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  const left = 36;
  const bottom = h - 18;
  context.clearRect(0, 0, width, height);
  const now = Date.now() / 1000;
  let top = 1;
  for (const points of series.values()) {
    for (const [, value] of points) top = Math.max(top, value);
  }
  top = niceTop(top);
  context.strokeStyle = "#ccc";
  context.fillStyle = "#555";
  context.font = "11px sans-serif";
  for (const fraction of [0, 0.5, 1]) {
    const y = bottom - fraction * (bottom - 14);
    context.beginPath();
    context.moveTo(left, y);
    context.lineTo(w - 4, y);
    context.stroke();
    context.fillText(formatNumber(top * fraction), 2, y + 4);
  }
  context.fillText(`-${KEEP_S / 60} min`, left, h - 4);
  context.fillText(`now ${unit}`, w - 60, h - 4);
  let colour = 0;
  const latest = {};
  for (const [name, points] of series) {
    context.strokeStyle = COLORS[colour % COLORS.length];
    context.lineWidth = 2;
    context.beginPath();
    points.forEach(([at, value], index) => {
      const x = left + ((KEEP_S - (now - at)) / KEEP_S) * (w - 4 - left);
      const y = bottom - (value / top) * (bottom - 14);
      if (index === 0) context.moveTo(x, y);
      else context.lineTo(x, y);
    });
    context.stroke();
    context.fillStyle = COLORS[colour % COLORS.length];
    const last = points.length ? points[points.length - 1][1] : 0;
    const columns = Math.max(1, Math.floor((w - left) / 92));
    context.fillText(`${name} ${formatNumber(last)}`, left + 6 + (colour % columns) * 92,
      12 + Math.floor(colour / columns) * 12);
    latest[name] = last;
    colour++;
  }
  // For tests and scripts: what the plot shows now, and how many samples it holds.
  canvas.dataset.latest = JSON.stringify(latest);
  canvas.dataset.samples = String(samples.length);
}

function niceTop(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return value;
}

function formatNumber(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(value < 10 ? 2 : 0);
}

const PLOTS = [
  ["queue", "Queued, per tier", "", (f) =>
    tiersOf(f.queue_by_tier).map((tier) => [tier, f.queue_by_tier[tier]])],
  ["running", "Running, per tier", "", (f) =>
    tiersOf(f.running_by_tier).map((tier) => [tier, f.running_by_tier[tier]])],
  ["decisions", "Decisions per second", "/s", (f, sample, previous) => {
    const before = previous && previous.status.models[sample.model];
    if (!before || before.error) return []; // no rate without two good samples
    const gap = Math.max(0.001, sample.at - previous.at);
    return ["admitted", "shed", "expired", "preempted"].map((decision) => [
      decision, Math.max(0, (sumValues(f[decision]) - sumValues(before[decision])) / gap),
    ]);
  }],
  ["wait", "Wait estimate, per tier", "s", (f) =>
    tiersOf(f.wait_estimate_s_by_tier).map((tier) => [tier, f.wait_estimate_s_by_tier[tier]])],
  ["replicas", "Replicas and autoscaling limits", "", (f, sample) => {
    const row = sample.status.scaling.find((r) => r.model === sample.model);
    const rows = [["replicas", f.replicas]];
    if (row) {
      rows.push(["target", row.target_replicas ?? 0], ["min", row.min ?? 0],
        ["max", row.max ?? 0]);
    }
    return rows;
  }],
];

const cards = new Map();

function modelCard(model) {
  if (cards.has(model)) return cards.get(model);
  const plots = {};
  const grid = el("div", { class: "plots" });
  for (const [key, title] of PLOTS) {
    const canvas = el("canvas", { class: "plot", "data-plot": key, "aria-label": title });
    plots[key] = canvas;
    grid.append(el("figure", {}, el("figcaption", { text: title }), canvas));
  }
  const form = limitsForm(model);
  const card = el("section", { class: "card", "data-model": model },
    el("h2", { text: model }), grid, form);
  $("models").append(card);
  const entry = { card, plots, form };
  cards.set(model, entry);
  return entry;
}

function limitsForm(model) {
  const form = el("form", { class: "limits" });
  const inputs = {
    min_replicas: el("input", { type: "number", min: "0", name: "min_replicas" }),
    max_replicas: el("input", { type: "number", min: "1", name: "max_replicas" }),
    target_ongoing_requests: el("input", { type: "number", min: "0.1", step: "0.1",
      name: "target_ongoing_requests" }),
    free_weight: el("input", { type: "number", min: "0", max: "10", step: "0.1",
      name: "free_weight", placeholder: "unchanged" }),
  };
  const allowZero = el("input", { type: "checkbox", name: "allow_zero" });
  const answer = el("p", { class: "limits-answer", role: "status" });
  const button = el("button", { type: "submit", text: "Apply limits" });
  form.append(
    el("label", {}, "min ", inputs.min_replicas),
    el("label", {}, "max ", inputs.max_replicas),
    el("label", {}, "per replica ", inputs.target_ongoing_requests),
    el("label", {}, "free weight ", inputs.free_weight),
    el("label", {}, allowZero, " allow zero"),
    button, answer,
  );
  form.fill = (row, allowed) => {
    button.disabled = !allowed;
    if (!allowed) answer.textContent = "Limit changes are off here; use mediagate scale set.";
    if (form.contains(document.activeElement) || !row) return;
    const shown = { min_replicas: row.min, max_replicas: row.max,
      target_ongoing_requests: row.target_per_replica };
    for (const [name, value] of Object.entries(shown)) {
      // what the deployment has; only fields changed from it are sent
      inputs[name].value = value ?? "";
      inputs[name].dataset.deployed = inputs[name].value;
    }
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { model, allow_zero: allowZero.checked };
    for (const [name, input] of Object.entries(inputs)) {
      // Only what the operator changed: a value shown from an older sample must not
      // undo a change made meanwhile (from another page or `mediagate scale set`).
      if (input.value !== "" && input.value !== input.dataset.deployed) {
        body[name] = Number(input.value);
      }
    }
    answer.className = "limits-answer";
    try {
      const changed = await api("/v1/ops/limits", { method: "POST", json: body });
      answer.textContent = changed.changes.length ? changed.changes.join("; ")
        : "Nothing changed: these are the deployed values.";
      document.activeElement.blur();
    } catch (error) {
      answer.className = "limits-answer error";
      answer.textContent = error.message;
    }
  });
  return form;
}

function render() {
  const last = samples[samples.length - 1];
  for (const model of Object.keys(last.status.models).sort()) {
    const { plots, form } = modelCard(model);
    for (const [key, , unit, pick] of PLOTS) {
      const series = seriesOf(model, (figures, sample, previous) =>
        pick(figures, { ...sample, model }, previous));
      draw(plots[key], series, unit);
    }
    form.fill(last.status.scaling.find((row) => row.model === model),
      last.status.limit_changes_allowed);
  }
  $("changes").replaceChildren(...last.status.recent_changes.map((entry) => el("li", {
    text: `${new Date(entry.at * 1000).toLocaleString()} · ${entry.by}: ${entry.changes.join("; ")}`,
  })));
  $("ops-state").textContent = last.status.scaling_error || "";
}

async function sample() {
  try {
    const status = await api("/v1/ops/status");
    samples.push({ at: Date.now() / 1000, status });
    while (samples.length && Date.now() / 1000 - samples[0].at > KEEP_S) samples.shift();
    render();
  } catch (error) {
    $("ops-state").textContent = error.status === 403
      ? "This key is not an operator key: sign in with one (mediagate keys create NAME --role operator)."
      : `No status: ${error.message}`;
  }
}

const $ = (id) => document.getElementById(id);

document.addEventListener("DOMContentLoaded", () => {
  $("sample-every").textContent = String(SAMPLE_S);
  $("keep-minutes").textContent = String(KEEP_S / 60);
  setUpSignIn(() => {
    sample();
    setInterval(sample, SAMPLE_S * 1000);
  });
});
