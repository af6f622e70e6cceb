// Symptom-consultation chat: keeps the conversation in the page, sends what fits the model's context, streams the
// reply as safe Markdown, and shows the server's emergency triage above it.
"use strict";

const messagesEl = document.getElementById("messages");
const form = document.getElementById("composer");
const input = document.getElementById("input");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const trimNote = document.getElementById("trim-note");
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("api-key");
const keyError = document.getElementById("key-error");
// Token estimate for trimming: English runs ~4 characters per Starling token, 3 leaves a margin; 8 tokens per
// message for its role prefix and end-of-turn. The server's own count is checked again on every request.
const CHARS_PER_TOKEN = 3;
const TOKENS_PER_MESSAGE = 8;
const TRIAGE_TITLES = {emergency: "Possible emergency", urgent: "See a doctor soon"};
let conversation = [];  // {role, content, el}: everything said, shown in the page
let contextTokens = null;
let controller = null;

function addBubble(role, text) {
  document.getElementById("empty")?.remove();
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.textContent = text;  // a person's own text: shown as typed
  messagesEl.appendChild(el);
  messagesEl.scrollTop = messagesEl.scrollHeight;
  return el;
}

function tokens(messages) {
  return messages.reduce((n, m) => n + Math.ceil(m.content.length / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE, 0);
}

// How many of the oldest messages to leave out so that the rest fits, keeping room for the server's system prompt
// and the reply. The latest message always goes, and what is sent never starts with a reply.
function oldestToDrop(messages, atLeast = 0) {
  const budget = contextTokens ? contextTokens - Math.min(1024, Math.floor(contextTokens / 3)) : Infinity;
  let start = atLeast;
  while (start < messages.length - 1 && (tokens(messages.slice(start)) > budget || messages[start].role !== "user")) {
    start += 1;
  }
  return start;
}

function showTrimmed(turn, dropped) {
  turn.forEach((m, i) => m.el.classList.toggle("trimmed", i < dropped));
  trimNote.hidden = dropped === 0;
  trimNote.textContent = `The ${dropped} oldest message${dropped === 1 ? " is" : "s are"} no longer sent: the ` +
    "conversation is longer than the model can read at once. Start a new chat for a new topic.";
}

function showTriage(triage, before) {
  if (!triage || !TRIAGE_TITLES[triage.level]) return;
  const banner = document.createElement("div");
  banner.className = `triage-banner ${triage.level}`;
  banner.setAttribute("role", "alert");
  const title = document.createElement("strong");
  title.textContent = TRIAGE_TITLES[triage.level];
  const notice = document.createElement("p");
  notice.textContent = triage.notice;
  const why = document.createElement("p");
  why.className = "why";
  why.textContent = `Flagged in your message: ${triage.matched.map((m) => m.label).join("; ")}.`;
  banner.append(title, notice, why);
  messagesEl.insertBefore(banner, before);
}

function markIncomplete(bubble, text) {
  bubble.classList.add("incomplete");
  const note = document.createElement("span");
  note.className = "incomplete-note";
  note.textContent = text;
  bubble.append(note);
}

function setBusy(busy) {
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
  sendButton.disabled = busy;
}

async function send(text) {
  const turn = conversation;  // "New chat" may replace the conversation while this reply streams
  turn.push({role: "user", content: text, el: addBubble("user", text)});
  const bubble = addBubble("assistant pending", "");
  let reply = "";
  setBusy(true);
  controller = new AbortController();
  let dropped = oldestToDrop(turn);
  try {
    for (;;) {
      showTrimmed(turn, dropped);
      const messages = turn.slice(dropped).map(({role, content}) => ({role, content}));
      try {
        const complete = await streamReply(messages, {
          onFirst: (chunk) => showTriage(chunk.triage, bubble),
          onDelta: (piece) => {
            reply += piece;
            bubble.replaceChildren(renderMarkdown(reply));
            messagesEl.scrollTop = messagesEl.scrollHeight;
          },
        }, controller.signal);
        if (!complete) markIncomplete(bubble, "Reply incomplete: the connection was cut before the end.");
        break;
      } catch (err) {  // the server counted more tokens than estimated: leave out one more exchange
        if (err.code !== "context_length_exceeded" || dropped >= turn.length - 1) throw err;
        dropped = oldestToDrop(turn, dropped + 1);
      }
    }
    turn.push({role: "assistant", content: reply, el: bubble});
  } catch (err) {
    if (err.name === "AbortError") {  // Stop (or New chat): keep what arrived, marked as cut short
      markIncomplete(bubble, "Stopped.");
      if (reply) turn.push({role: "assistant", content: reply, el: bubble});
      return;
    }
    bubble.classList.add("error");
    bubble.textContent = `Sorry, something went wrong: ${err.message}`;
    turn.pop();  // not part of the conversation: put it back in the box to edit and resend
    if (!input.value) input.value = text;
    if (err.status === 401) askForKey("The access key was not accepted. Enter it again.");
  } finally {
    bubble.classList.remove("pending");
    setBusy(false);
    controller = null;
  }
}

function askForKey(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  keyError.textContent = message;
  keyForm.hidden = false;
  keyInput.focus();
}

async function connect() {
  try {
    contextTokens = await contextSize();
    keyForm.hidden = true;
    input.focus();
  } catch (err) {
    if (err.status === 401) askForKey(sessionStorage.getItem(KEY_STORAGE) ? "That key was not accepted." : "");
  }
}

keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, keyInput.value.trim());
  keyInput.value = "";
  connect();
});

form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || sendButton.disabled) return;
  input.value = "";
  input.style.height = "";
  send(text);
});

stopButton.addEventListener("click", () => controller?.abort());

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
  trimNote.hidden = true;
  const hint = document.createElement("p");
  hint.id = "empty";
  hint.className = "hint";
  hint.textContent = "New conversation. Describe your symptoms.";
  messagesEl.replaceChildren(hint);
  input.focus();
});

connect();
