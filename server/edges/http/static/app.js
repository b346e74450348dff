// classifyd status page: polls /status.json every second and classifies dropped images with /v1/models/{m}/classify.
// Plain browser JavaScript, no build step. Text from the server is always set as text, never as HTML.
"use strict";

const POLL_MS = 1000;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value, digits = 1) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function renderServer(server, workers) {
  const parts = [`v${server.version}`, `device ${server.device}`, `gRPC ${server.host}:${server.grpc_port}`,
    `HTTP ${server.http_port}`, `up ${duration(server.uptime_s)}`];
  if (workers) {  // --workers: the figures below add up every worker's
    parts.push(`${workers.length} workers (${workers.map((w) => `pid ${w.pid}: ${w.requests} req`).join(", ")})`);
  }
  document.getElementById("server").textContent = parts.join(" · ");
}

function histogram(buckets) {
  const entries = Object.entries(buckets);
  const peak = Math.max(1, ...entries.map(([, n]) => n));
  return el("div", { class: "histogram", title: "requests by the size of the batch they were computed in" },
    entries.map(([size, n]) => el("div", { class: "bar", title: `batch ${size}: ${n} requests` },
      el("div", { class: "fill", style: `height: ${n ? Math.max(2, (70 * n) / peak) : 0}%` }),
      el("div", { class: "label" }, size))));
}

function versionRows(model) {
  return model.versions.map((v) => el("tr", { "data-version": v.version },
    el("td", {}, `v${v.version}`, v.version === model.serving_version ? " (serving)" : ""),
    el("td", {}, el("span", { class: "badge state", "data-state": v.state }, v.state)),
    el("td", { class: "num" }, v.generation),
    el("td", { class: "num" }, v.validation_accuracy === null ? "–" : `${fmt(100 * v.validation_accuracy)}%`),
    el("td", { class: "error" }, v.error || "")));
}

// The online cap tuner: the cap (and torch threads, when it chooses them), what is on trial, each setting's
// estimate while serving, the moves so far.
function tuningLine(t) {
  const setting = (size, threads) => (t.threads ? `${size}×${threads}t` : `${size}`);
  const sizes = t.estimates.map((e) => `${setting(e.batch_size, e.threads)}:${fmt(e.images_per_second, 0)}` +
    `${e.batch_size === t.cap && (!t.threads || e.threads === t.threads) ? "*" : ""}`);
  const cap = t.threads ? `batch cap ${t.cap} on ${t.threads} torch thread(s)` : `batch cap ${t.cap}`;
  const trying = t.exploring ? `trying ${setting(t.exploring, t.exploring_threads)}` : null;
  const how = t.cap_online ? "tuned while serving" : "pinned; threads tuned while serving";
  const text = [`${cap} (${how})`, trying,
    sizes.length ? `images/s ${sizes.join(" ")}` : null, `${t.changes} moves, ${t.trials} trials`]
    .filter(Boolean).join(" · ");
  return el("div", { class: "muted", "data-metric": "batch-tuning", title: t.last_change || "" }, text);
}

// A rollout candidate's live figures against the serving version (docs/rollout.md).
function rolloutLine(r) {
  const figures = r.compared === undefined ? ["no comparison yet"] : [
    `${r.compared}/${r.min_requests} compared`, `agreement ${fmt(100 * r.agreement)}% (min ${fmt(100 * r.min_agreement)}%)`,
    `top-k overlap ${fmt(100 * r.topk_overlap)}%`, `errors ${r.errors}`,
    r.compute_ratio === null ? null : `compute ×${fmt(r.compute_ratio, 2)}`, r.labels_differ ? "labels differ" : null];
  const text = [`v${r.candidate_version} ${r.mode} candidate (${r.decision})`, ...figures].filter(Boolean).join(" · ");
  return el("div", { class: "muted", "data-metric": "rollout" }, text);
}

function modelCard(model) {
  const stats = model.stats;
  const loading = model.versions.some((v) => v.state === "LOADING");
  const serving = model.serving_version
    ? el("span", { class: "badge serving-version", "data-state": "serving" }, `serving v${model.serving_version}`)
    : loading  // still starting (or a first version loading): not a failure
      ? el("span", { class: "badge serving-version", "data-state": "LOADING" }, "loading")
      : model.versions.length && model.versions.every((v) => v.state === "AVAILABLE")  // --model-control explicit
        ? el("span", { class: "badge serving-version", "data-state": "AVAILABLE" }, "not loaded")
        : el("span", { class: "badge serving-version", "data-state": "FAILED" }, "not serving");
  const facts = [model.architecture, model.input && `${model.input.width}×${model.input.height} ${model.input.color}`,
    model.num_labels && `${model.num_labels} labels`, model.device && `on ${model.device}`,
    model.max_batch_size && `batch ≤ ${model.max_batch_size}`,
    model.max_delay_ms !== null && model.max_delay_ms !== undefined && `delay ${model.max_delay_ms} ms`]
    .filter(Boolean).join(" · ");
  const metric = (value, label, key) => el("div", { class: "metric", "data-metric": key }, el("b", {}, value),
    el("span", {}, label));
  return el("article", { class: "card model", "data-model": model.name },
    el("h3", {}, el("span", { class: "name" }, model.name), model.default ? el("span", { class: "badge" }, "default") : null,
      serving),
    el("div", { class: "facts" }, facts),
    el("div", { class: "metrics" },
      metric(fmt(stats.requests_per_s, 1), "requests/s (10 s)", "rate"),
      metric(stats.requests, "requests", "requests"),
      metric(fmt(stats.latency_ms.p50, 2), "p50 ms", "p50"),
      metric(fmt(stats.latency_ms.p90, 2), "p90 ms", "p90"),
      metric(fmt(stats.latency_ms.p99, 2), "p99 ms", "p99"),
      metric(model.queue_depth, "queued now", "queued"),
      model.cache ? metric(model.cache.hit_rate === null ? "–" : `${fmt(100 * model.cache.hit_rate)}%`,
        `cache hits (${model.cache.hits} of ${model.cache.hits + model.cache.misses})`, "cache") : null),
    el("div", { class: "muted" }, "requests by batch size"),
    histogram(stats.batch_sizes),
    model.batch_tuning ? tuningLine(model.batch_tuning) : null,
    model.rollout ? rolloutLine(model.rollout) : null,
    el("table", { class: "versions" },
      el("thead", {}, el("tr", {}, el("th", {}, "version"), el("th", {}, "state"), el("th", { class: "num" }, "gen"),
        el("th", { class: "num" }, "validation"), el("th", {}, "error"))),
      el("tbody", {}, versionRows(model))));
}

function renderModels(models) {
  const box = document.getElementById("models");
  box.replaceChildren(...(models.length ? models.map(modelCard) : [el("p", { class: "muted" }, "no models")]));
  const select = document.getElementById("classify-model");
  const chosen = select.value;
  const names = models.map((m) => m.name);
  if (names.join("\n") !== [...select.options].map((o) => o.value).join("\n")) {
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    const fallback = models.find((m) => m.default) || models[0];
    select.value = names.includes(chosen) ? chosen : fallback ? fallback.name : "";
  }
}

function renderEvents(events) {
  const list = document.getElementById("events");
  if (!events.length) return list.replaceChildren(el("li", { class: "muted" }, "none yet"));
  list.replaceChildren(...events.map((e) => el("li", { class: "event", "data-kind": e.kind },
    el("time", {}, clock(e.time_unix_ms)),
    el("b", {}, `${e.model} v${e.version}`), " ",
    el("span", { class: "badge", "data-state": e.kind === "UNLOADED" ? "" : e.kind }, e.kind),
    e.serving ? " now serving" : "",
    e.reason ? el("div", { class: e.kind === "FAILED" ? "error" : "muted" }, e.reason) : null)));
}

async function poll() {
  const badge = document.getElementById("connection");
  try {
    const response = await fetch("/status.json", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const status = await response.json();
    renderServer(status.server, status.workers);
    renderModels(status.models);
    renderEvents(status.events);
    badge.textContent = "live";
    badge.dataset.state = "live";
  } catch (error) {
    badge.textContent = `offline (${error.message})`;
    badge.dataset.state = "offline";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function showResult(...nodes) {
  document.getElementById("classify-result").replaceChildren(...nodes);
}

async function classify(file) {
  const model = document.getElementById("classify-model").value;
  const topK = document.getElementById("classify-top-k").value || "0";
  if (!file) return;
  showResult(el("div", { class: "summary" }, `classifying ${file.name}…`));
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("top_k", topK);
  try {
    const response = await fetch(`/v1/models/${encodeURIComponent(model)}/classify`, { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      showResult(el("div", { class: "error", id: "classify-error" }, `${body.error.code}: ${body.error.message}`));
      return;
    }
    const preview = el("img", { class: "preview", alt: file.name, src: URL.createObjectURL(file) });
    preview.addEventListener("load", () => URL.revokeObjectURL(preview.src));
    showResult(
      preview,
      el("div", { class: "summary" },
        `${file.name}: ${body.model} v${body.version}, batch ${body.batch_size}, ` +
        `${fmt((body.queue_us + body.compute_us + body.preprocess_us) / 1000, 2)} ms`),
      el("table", { class: "predictions" },
        el("thead", {}, el("tr", {}, el("th", { class: "num" }, "score"), el("th", { class: "num" }, "index"),
          el("th", {}, "label"))),
        el("tbody", {}, body.predictions.map((p) => el("tr", { class: "prediction" },
          el("td", { class: "num" }, fmt(p.score, 4)), el("td", { class: "num" }, p.index),
          el("td", { class: "label" }, p.label))))));
  } catch (error) {
    showResult(el("div", { class: "error", id: "classify-error" }, String(error)));
  }
}

function setUpDropZone() {
  const zone = document.getElementById("drop-zone");
  const input = document.getElementById("classify-file");
  input.addEventListener("change", () => {
    classify(input.files[0]);
    input.value = "";
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    classify(event.dataTransfer.files[0]);
  });
}

setUpDropZone();
poll();
