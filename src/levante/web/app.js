// The Levante chat page: lists models from /v1/models and streams /v1/chat/completions (SSE).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "levante-api-key";
const chat = { history: [], controller: null };

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

// Shows the key dialog; resolves once the user has entered a key.
function askForKey(problem) {
  return new Promise((resolve) => {
    $("key-error").textContent = problem;
    $("key-error").hidden = !problem;
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
      $("key-dialog").close();
      resolve();
    };
    $("key-dialog").showModal();
  });
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return body.error?.message ?? body.error ?? text;
  } catch {
    return text || `HTTP ${response.status}`;
  }
}

// fetch() that asks for the API key (and retries) while the server answers 401.
async function fetchWithKey(url, options = {}) {
  for (;;) {
    const response = await fetch(url, { ...options, headers: headers() });
    if (response.status !== 401) return response;
    const hadKey = Boolean(sessionStorage.getItem(KEY_STORAGE));
    await askForKey(hadKey ? "That key was refused; try again." : "");
  }
}

async function loadModels() {
  const response = await fetchWithKey("/v1/models");
  if (!response.ok) throw new Error(await errorMessage(response));
  const { data } = await response.json();
  $("model").replaceChildren(...data.map((model) => new Option(model.id, model.id)));
  document.body.dataset.ready = "true";
}

function addMessage(role, text) {
  const message = document.createElement("div");
  message.className = `msg ${role}`;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;  // text, never HTML: the model's output is untrusted
  message.append(content);
  if (role === "assistant") {
    const stats = document.createElement("div");
    stats.className = "stats";
    message.append(stats);
  }
  $("messages").append(message);
  message.scrollIntoView({ block: "end" });
  return message;
}

// Time to first token and decode speed of one answer, shown live under it.
class Figures {
  constructor(element) {
    this.element = element;
    this.start = performance.now();
    this.first = null;
    this.last = null;
    this.tokens = 0;
  }

  token() {
    this.last = performance.now();
    if (this.first === null) this.first = this.last;
    this.tokens += 1;
  }

  show(state) {
    const parts = [];
    if (this.first !== null) {
      parts.push(`first token ${((this.first - this.start) / 1000).toFixed(2)} s`);
    }
    const seconds = (this.last - this.first) / 1000;
    if (this.tokens > 1 && seconds > 0) {
      parts.push(`${((this.tokens - 1) / seconds).toFixed(1)} tokens/s`);
    }
    parts.push(`${this.tokens} tokens`);
    if (state === "stopped") parts.push("stopped");
    this.element.textContent = parts.join(" · ");
    this.element.dataset.state = state;
  }
}

// The request body; throws SyntaxError when the schema box holds invalid JSON.
function requestBody(text) {
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []),
    ...chat.history, { role: "user", content: text }];
  const body = {
    model: $("model").value, messages, stream: true,
    stream_options: { include_usage: true }, temperature: Number($("temperature").value),
  };
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  const schema = $("schema").value.trim();
  if (schema) {
    body.response_format = {
      type: "json_schema", json_schema: { name: "answer", schema: JSON.parse(schema), strict: true },
    };
  }
  return body;
}

// The parsed `data:` payloads of a server-sent event stream, until `[DONE]`.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// Streams one answer into `message`; returns [text, outcome] (done | stopped | error).
async function stream(body, message) {
  const content = message.querySelector(".content");
  const figures = new Figures(message.querySelector(".stats"));
  let answer = "";
  try {
    const response = await fetchWithKey("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), signal: chat.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) figures.tokens = event.usage.completion_tokens;
      const delta = event.choices?.[0]?.delta;
      if (delta) {
        figures.token();
        answer += delta.content ?? "";
        content.textContent = answer;
      }
      figures.show("streaming");
    }
    figures.show("done");
    return [answer, "done"];
  } catch (error) {
    if (error.name === "AbortError") {
      figures.show("stopped");
      return [answer, "stopped"];
    }
    message.classList.add("error");
    content.textContent = answer ? `${answer}\n\n${error.message}` : error.message;
    figures.show("error");
    return [answer, "error"];
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  let body;
  try {
    body = requestBody(text);
    $("schema-error").hidden = true;
  } catch (error) {
    $("schema-error").textContent = `The schema is not valid JSON: ${error.message}`;
    $("schema-error").hidden = false;
    return;
  }
  addMessage("user", text);
  const message = addMessage("assistant", "");
  chat.controller = new AbortController();
  setBusy(true);
  const [answer, outcome] = await stream(body, message);
  chat.controller = null;
  setBusy(false);
  if (answer && outcome !== "error") {  // a stopped answer stays part of the conversation
    chat.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  }
}

function newChat() {
  chat.controller?.abort();
  chat.history = [];
  $("messages").replaceChildren();
}

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message").value.trim();
    if (!text || chat.controller) return;
    $("message").value = "";
    send(text);
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => chat.controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("temperature").addEventListener("input", () => {
    $("temperature-value").value = $("temperature").value;
  });
}

wire();
loadModels().catch((error) => {
  $("status").textContent = `Could not list models: ${error.message}`;
  $("status").hidden = false;
});
