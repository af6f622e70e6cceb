// Talking to medtune-serve: the API key (asked for once, kept for this tab's session only) and streamed replies
// (OpenAI-style server-sent events read with fetch + ReadableStream).
"use strict";

const KEY_STORAGE = "medtune-api-key";

class APIError extends Error {
  constructor(status, body) {
    super(body.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body.error?.code;
  }
}

async function apiFetch(path, options = {}) {
  const headers = {"Content-Type": "application/json"};
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const res = await fetch(path, {...options, headers});
  if (!res.ok) throw new APIError(res.status, await res.json().catch(() => ({})));
  return res;
}

// The context size the server reports (vLLM's `max_model_len` field), or null.
async function contextSize() {
  const models = (await (await apiFetch("/v1/models")).json()).data;
  return models[0]?.max_model_len || null;
}

// Streams a reply: onFirst(chunk) once (it carries the triage), onDelta(text) once per read with the pieces that
// arrived together (the page re-renders the whole reply on each call). Resolves true when the server ended the
// reply ([DONE]), false when the stream was cut before that.
async function streamReply(messages, {onFirst, onDelta}, signal) {
  const res = await apiFetch("/v1/chat/completions", {
    method: "POST", body: JSON.stringify({messages, stream: true}), signal,
  });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let first = true;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\n\n");
    buffer = events.pop();  // an incomplete event waits for the next read
    let text = "";
    try {
      for (const event of events) {
        const data = event.replace(/^data: ?/, "");
        if (data === "[DONE]") return true;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (first) onFirst(chunk);
        first = false;
        text += chunk.choices?.[0]?.delta?.content || "";
      }
    } finally {
      if (text) onDelta(text);  // also before [DONE] or an error ends the stream
    }
  }
}
