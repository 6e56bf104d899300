// loradock server page: Prometheus text from /metrics, parsed and shown every 2 s.
// Written for this project.
"use strict";

let previous = null;

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)$/);
    if (!m) continue;
    const labels = {};
    for (const pair of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    samples.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return samples;
}

function one(samples, name) {
  const s = samples.find((x) => x.name === name);
  return s ? s.value : 0;
}

function histogram(samples, name, target, summary, unit) {
  const buckets = samples.filter((s) => s.name === name + "_bucket");
  const count = one(samples, name + "_count");
  const sum = one(samples, name + "_sum");
  const box = document.getElementById(target);
  box.innerHTML = "";
  let below = 0;
  const per = buckets.map((b) => { const n = b.value - below; below = b.value; return { le: b.labels.le, n }; });
  const top = Math.max(1, ...per.map((p) => p.n));
  for (const p of per) {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.height = `${(100 * p.n) / top}%`;
    bar.title = `≤ ${p.le} ${unit}: ${p.n}`;
    bar.innerHTML = `<em>${p.n || ""}</em><span>${p.le === "+Inf" ? "more" : "≤" + p.le}</span>`;
    box.appendChild(bar);
  }
  document.getElementById(summary).textContent = count
    ? `${count} observed, mean ${(sum / count).toFixed(3)} ${unit}` : "nothing observed yet";
}

function show(name, value) {
  const node = document.querySelector(`[data-figure="${name}"]`);
  if (node) node.textContent = value;
}

async function refresh() {
  let text;
  try {
    text = await (await fetch("/metrics", { cache: "no-store" })).text();
  } catch (err) {
    show("status", "unreachable");
    return;
  }
  const samples = parseMetrics(text);
  const p = "loradock_";
  const requests = samples.filter((s) => s.name === p + "requests_total");
  show("requests", requests.reduce((a, s) => a + s.value, 0));
  show("errors", requests.filter((s) => Number(s.labels.status) >= 400).reduce((a, s) => a + s.value, 0));
  const completion = one(samples, p + "completion_tokens_total");
  const now = performance.now();
  show("completion", completion);
  if (previous) {
    const rate = (completion - previous.completion) / ((now - previous.at) / 1000);
    show("tps", rate.toFixed(1));
  }
  previous = { completion, at: now };
  show("running", one(samples, p + "running_requests"));
  show("queue", one(samples, p + "queue_depth"));
  show("resident", one(samples, p + "adapters_resident"));
  const status = samples.find((s) => s.name === p + "engine_status" && s.value === 1);
  show("status", status ? status.labels.status : "?");
  histogram(samples, p + "time_to_first_token_seconds", "ttft", "ttft-summary", "s");
  histogram(samples, p + "adapter_load_seconds", "loads", "loads-summary", "s");
  const body = document.querySelector("#routes tbody");
  body.innerHTML = "";
  for (const s of requests) {
    const row = body.insertRow();
    row.insertCell().textContent = s.labels.route;
    row.insertCell().textContent = s.labels.status;
    row.insertCell().textContent = s.value;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  refresh();
  setInterval(refresh, 2000);
});
