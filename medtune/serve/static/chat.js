// Symptom-consultation chat: keeps the conversation in the page and streams replies from
// /v1/chat/completions (OpenAI-style server-sent events) with fetch + ReadableStream.
"use strict";

const messagesEl = document.getElementById("messages");
const form = document.getElementById("composer");
const input = document.getElementById("input");
const sendButton = document.getElementById("send");
let conversation = [];
let controller = null;

function addBubble(role, text) {
  document.getElementById("empty")?.remove();
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.textContent = text;  // text, never HTML: model output is untrusted
  messagesEl.appendChild(el);
  messagesEl.scrollTop = messagesEl.scrollHeight;
  return el;
}

// Calls onDelta(text) for each streamed piece; resolves when the server sends [DONE].
async function streamReply(messages, onDelta, signal) {
  const res = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({messages, stream: true}),
    signal,
  });
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw new Error(body.error?.message || `HTTP ${res.status}`);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\n\n");
    buffer = events.pop();  // an incomplete event waits for the next read
    for (const event of events) {
      const data = event.replace(/^data: ?/, "");
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const text = chunk.choices?.[0]?.delta?.content;
      if (text) onDelta(text);
    }
  }
}

async function send(text) {
  conversation.push({role: "user", content: text});
  addBubble("user", text);
  const bubble = addBubble("assistant pending", "");
  sendButton.disabled = true;
  controller = new AbortController();
  const turn = conversation;
  try {
    await streamReply(turn, (piece) => {
      bubble.textContent += piece;
      messagesEl.scrollTop = messagesEl.scrollHeight;
    }, controller.signal);
    turn.push({role: "assistant", content: bubble.textContent});
  } catch (err) {
    if (err.name === "AbortError") return;
    bubble.classList.add("error");
    bubble.textContent = `Sorry, something went wrong: ${err.message}`;
    turn.pop();  // not part of the conversation: put it back in the box to edit and resend
    if (!input.value) input.value = text;
  } finally {
    bubble.classList.remove("pending");
    sendButton.disabled = false;
    controller = null;
  }
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || sendButton.disabled) return;
  input.value = "";
  input.style.height = "";
  send(text);
});

// Enter sends, Shift+Enter starts a new line.
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    form.requestSubmit();
  }
});

input.addEventListener("input", () => {
  input.style.height = "";
  input.style.height = `${input.scrollHeight}px`;
});

document.getElementById("new-chat").addEventListener("click", () => {
  controller?.abort();
  conversation = [];
  const hint = document.createElement("p");
  hint.id = "empty";
  hint.className = "hint";
  hint.textContent = "New conversation. Describe your symptoms.";
  messagesEl.replaceChildren(hint);
  input.focus();
});

input.focus();
