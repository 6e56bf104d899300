// loradock playground: one prompt streamed from /v1/chat/completions to several models at once.
// Written for this project. It uses only the public API, with the console's key as Bearer.
"use strict";

let running = [];

function selectedModels() {
  return Array.from(document.querySelectorAll("#model-picker input[name=model]:checked")).map((i) => i.value);
}

function limitChoices() {
  const max = Number(document.getElementById("playground").dataset.max);
  const boxes = Array.from(document.querySelectorAll("#model-picker input[name=model]"));
  const update = () => {
    const full = boxes.filter((b) => b.checked).length >= max;
    for (const box of boxes) box.disabled = full && !box.checked;
  };
  for (const box of boxes) box.addEventListener("change", update);
  update();
}

/** The conversation: system prompt, then every turn in order (the last one is the user's). */
function conversation() {
  const messages = [];
  const system = document.getElementById("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const box of document.querySelectorAll("#turns textarea")) {
    messages.push({ role: box.dataset.role || "user", content: box.value });
  }
  return messages;
}

/** Insert an assistant answer and a new user message before sending again. */
function addTurn() {
  const turns = document.getElementById("turns");
  for (const role of ["assistant", "user"]) {
    const label = document.createElement("label");
    label.textContent = role === "assistant" ? "Assistant" : "User";
    const box = document.createElement("textarea");
    box.rows = 2;
    box.dataset.role = role;
    label.appendChild(box);
    turns.appendChild(label);
  }
  turns.lastElementChild.querySelector("textarea").focus();
}

function requestBody(model) {
  const messages = conversation();
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number(document.getElementById("temperature").value),
    max_tokens: Number(document.getElementById("max-tokens").value),
  };
  const format = document.getElementById("response-format").value;
  if (format === "json_object") body.response_format = { type: format };
  if (format === "json_schema") {
    body.response_format = {
      type: format,
      json_schema: { name: "answer", schema: JSON.parse(document.getElementById("schema").value) },
    };
  }
  return body;
}

function makeColumn(model) {
  const node = document.getElementById("column-template").content.firstElementChild.cloneNode(true);
  node.dataset.model = model;
  node.querySelector("code.model").textContent = model;
  document.getElementById("columns").appendChild(node);
  return node;
}

function fmtMs(ms) { return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`; }

async function streamOne(model, column, controller) {
  const answer = column.querySelector(".answer");
  const state = column.querySelector(".state");
  const started = performance.now();
  let first = null, chunks = 0, usage = null, finish = "";
  state.textContent = "sending";
  try {
    const body = requestBody(model);  // a schema that is not JSON shows its error in the column
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: apiHeaders(), body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try { message = (await response.json()).error.message; } catch (err) { /* not JSON */ }
      throw new Error(message);
    }
    state.textContent = "streaming";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const text = (choice.delta && choice.delta.content) || "";
            if (text) {
              if (first === null) {
                first = performance.now();
                column.querySelector(".ttft").textContent = fmtMs(first - started);
              }
              chunks += 1;
              answer.textContent += text;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
    const ended = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    column.querySelector(".tokens").textContent = String(tokens);
    if (first !== null && tokens > 1 && ended > first) {
      column.querySelector(".tps").textContent = ((tokens - 1) / ((ended - first) / 1000)).toFixed(1);
    }
    column.querySelector(".finish").textContent = finish ? `finish: ${finish}` : "";
    state.textContent = "done";
    column.classList.add("done");
  } catch (err) {
    state.textContent = controller.signal.aborted ? "stopped" : "error";
    if (!controller.signal.aborted) {
      answer.classList.add("error");
      answer.textContent = String(err.message || err);
    }
  }
}

async function sendAll(event) {
  event.preventDefault();
  const models = selectedModels();
  if (!models.length) return;
  document.getElementById("columns").innerHTML = "";
  const run = document.getElementById("run");
  const stop = document.getElementById("stop");
  run.disabled = true; stop.disabled = false;
  running = models.map((model) => ({ model, controller: new AbortController(), column: makeColumn(model) }));
  // All requests leave at once; each column fills as its own stream arrives.
  await Promise.all(running.map((r) => streamOne(r.model, r.column, r.controller)));
  run.disabled = false; stop.disabled = true;
  document.getElementById("columns").dataset.finished = String(Date.now());
}

document.addEventListener("DOMContentLoaded", () => {
  limitChoices();
  document.getElementById("add-turn").addEventListener("click", addTurn);
  const format = document.getElementById("response-format");
  format.addEventListener("change", () => {
    document.getElementById("schema-box").hidden = format.value !== "json_schema";
  });
  document.getElementById("playground").addEventListener("submit", sendAll);
  document.getElementById("stop").addEventListener("click", () => running.forEach((r) => r.controller.abort()));
});
