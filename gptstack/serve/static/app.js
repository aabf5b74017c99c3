// The chat page: the conversation lives here and goes to /v1/chat/completions whole, streamed back as
// server-sent events. Stop aborts the request; the server frees the answer's slot when the connection closes.
"use strict";
const $ = (id) => document.getElementById(id);
const chat = { messages: [], model: null, controller: null };

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "muted error" : "muted";
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function note(div, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  div.append(span);
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    chat.model = body.data[0].id;
    $("model").textContent = chat.model;
    status("");
  } catch (err) {
    status(`could not reach the model: ${err.message}`, true);
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Each server-sent event is "data: {...}" then a blank line; the last is "data: [DONE]".
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (event.startsWith("data: ") && event !== "data: [DONE]") yield JSON.parse(event.slice(6));
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || chat.controller) return;
  if (!chat.model) await loadModel();
  chat.messages.push({ role: "user", content: text });
  bubble("user", text);
  $("prompt").value = "";
  const div = bubble("assistant", "");
  const system = $("system").value.trim();
  const controller = (chat.controller = new AbortController());
  busy(true);
  status("");
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...headers() },
      signal: controller.signal,
      body: JSON.stringify({
        model: chat.model,
        stream: true,
        messages: [...(system ? [{ role: "system", content: system }] : []), ...chat.messages],
        temperature: Number($("temperature").value),
        ...($("max-tokens").value ? { max_tokens: Number($("max-tokens").value) } : {}),
      }),
    });
    if (!r.ok) {
      const body = await r.json();
      throw new Error(body.error ? body.error.message : r.statusText);
    }
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        div.textContent = answer;
        div.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason === "length") note(div, "(cut off: max tokens)");
    }
  } catch (err) {
    if (err.name === "AbortError") note(div, "(stopped)");
    else status(err.message, true);
  } finally {
    if (chat.controller === controller) {
      chat.messages.push({ role: "assistant", content: answer });
      chat.controller = null;
      busy(false);
    }
  }
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => chat.controller && chat.controller.abort());
$("new-chat").addEventListener("click", () => {
  if (chat.controller) chat.controller.abort();
  chat.controller = null;
  chat.messages = [];
  $("messages").replaceChildren();
  busy(false);
  status("");
});
$("temperature").addEventListener("input", () => ($("temperature-value").textContent = $("temperature").value));
$("api-key").addEventListener("change", loadModel);
loadModel();
