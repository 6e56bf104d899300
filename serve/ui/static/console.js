// loradock console: key cookie, copy buttons, live hub search. Written for this project.
"use strict";

const KEY_COOKIE = "loradock_key";

/** The console's API key (empty on a server without --api-keys). */
function consoleKey() {
  for (const part of document.cookie.split(";")) {
    const [name, ...rest] = part.trim().split("=");
    if (name === KEY_COOKIE) return decodeURIComponent(rest.join("="));
  }
  return "";
}

/** Headers for the public API: the same Bearer key an app would send. */
function apiHeaders(extra) {
  const headers = Object.assign({ "Content-Type": "application/json" }, extra || {});
  const key = consoleKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

function setKey(key) {
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = `${KEY_COOKIE}=${encodeURIComponent(key)}; Path=/; SameSite=Strict${secure}`;
}

function forgetKey() {
  document.cookie = `${KEY_COOKIE}=; Path=/; Max-Age=0; SameSite=Strict`;
  location.href = "/";
}

function initKeyForm() {
  const form = document.getElementById("key-form");
  if (!form) return;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setKey(document.getElementById("key-input").value.trim());
    location.href = form.dataset.next || "/";
  });
}

function initCopy() {
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", async () => {
      const text = document.getElementById(button.dataset.copy).textContent;
      try {
        await navigator.clipboard.writeText(text);
      } catch (err) {
        const range = document.createRange();
        range.selectNodeContents(document.getElementById(button.dataset.copy));
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        document.execCommand("copy");
      }
      button.textContent = "copied";
      setTimeout(() => { button.textContent = "copy"; }, 1500);
    });
  }
}

function initHubSearch() {
  const search = document.getElementById("search");
  const table = document.getElementById("adapters");
  if (!search || !table) return;
  const rows = Array.from(table.querySelectorAll("tr.adapter"));
  const shown = document.getElementById("shown-count");
  if (shown) shown.dataset.all = shown.textContent;
  search.addEventListener("input", () => {
    const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    let count = 0;
    for (const row of rows) {
      const ok = words.every((w) => row.dataset.search.includes(w));
      row.hidden = !ok;
      if (ok) count += 1;
    }
    if (shown) shown.textContent = words.length ? `${count} on this page match` : shown.dataset.all;
  });
  for (const select of document.querySelectorAll("#filters select, #filters input[type=checkbox]")) {
    select.addEventListener("change", () => select.form.submit());
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const forget = document.getElementById("forget-key");
  if (forget) forget.addEventListener("click", forgetKey);
  initKeyForm();
  initCopy();
  initHubSearch();
});
