// Shared by the playground and the operations view. Every request goes through
// `api()`: the key comes from this tab's session storage and goes out only in the
// Authorization header. Nothing is ever written as HTML: text goes in with
// textContent, so a prompt like <img src=x onerror=...> shows as the text it is.
"use strict";

const KEY_ITEM = "mediagate.api_key";

function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.type = error.type || null;
    this.retryAfter = retryAfter;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  headers.set("Authorization", `Bearer ${storedKey()}`);
  if (options.json !== undefined) {
    headers.set("Content-Type", "application/json");
    options = { ...options, body: JSON.stringify(options.json) };
  }
  // Relative to the page, so the console works under a route prefix too.
  const url = path.replace(/^\//, "");
  const response = await fetch(url, { ...options, headers, credentials: "omit" });
  if (options.raw && response.ok) return response;
  let body = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("application/json")) body = await response.json();
  if (!response.ok) {
    const retry = response.headers.get("retry-after");
    throw new ApiError(response.status, body, retry === null ? null : Number(retry));
  }
  return body;
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function duration(seconds) {
  seconds = Math.max(0, Math.ceil(seconds));
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (h) return `${h} h ${m} min ${s} s`;
  if (m) return `${m} min ${s} s`;
  return `${s} s`;
}

// A refusal as the server said it, with its Retry-After counted down live.
let countdownTimer = null;
function showRefusal(error) {
  const box = document.getElementById("refusal");
  if (!box) return;
  clearInterval(countdownTimer);
  document.getElementById("refusal-title").textContent =
    `${error.status || ""} ${error.code || error.type || "error"}`.trim();
  document.getElementById("refusal-message").textContent = error.message;
  const retry = document.getElementById("refusal-retry");
  // Built anew each time: the last countdown may have ended as "You can retry now."
  const countdown = el("span", { id: "refusal-countdown" });
  retry.replaceChildren("You can retry in ", countdown, ".");
  retry.hidden = !(error.retryAfter > 0);
  if (error.retryAfter > 0) {
    const until = Date.now() + error.retryAfter * 1000;
    const tick = () => {
      const left = (until - Date.now()) / 1000;
      countdown.textContent = duration(left);
      if (left <= 0) {
        clearInterval(countdownTimer);
        retry.replaceChildren("You can retry now.");
      }
    };
    tick();
    countdownTimer = setInterval(tick, 250);
  }
  box.hidden = false;
}

function clearRefusal() {
  const box = document.getElementById("refusal");
  if (box) box.hidden = true;
  clearInterval(countdownTimer);
}

// Sign in: check the key with GET /v1/usage (any key), then show the page.
function setUpSignIn(onSignedIn) {
  const form = document.getElementById("sign-in-form");
  const problem = document.getElementById("sign-in-error");
  async function enter() {
    let usage;
    try {
      usage = await api("/v1/usage");
    } catch (error) {
      sessionStorage.removeItem(KEY_ITEM);
      problem.textContent = error.message;
      problem.hidden = false;
      return;
    }
    problem.hidden = true;
    document.getElementById("sign-in").hidden = true;
    document.getElementById("app").hidden = false;
    document.getElementById("who").hidden = false;
    document.getElementById("who-name").textContent =
      `${usage.account} · ${usage.tier}${usage.role === "operator" ? " · operator" : ""}`;
    const opsLink = document.getElementById("ops-link");
    if (opsLink) opsLink.hidden = usage.role !== "operator";
    onSignedIn(usage);
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("key");
    sessionStorage.setItem(KEY_ITEM, input.value.trim());
    input.value = "";
    enter();
  });
  document.getElementById("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_ITEM);
    location.reload();
  });
  if (storedKey()) enter();
}
