// Safe Markdown for model replies: paragraphs, bullet and numbered lists, **bold**, *italic*, `code` and fenced
// code blocks. Every piece of model text becomes a DOM text node (never HTML), so nothing the model writes can turn
// into markup or script; unknown syntax simply stays visible as text.
"use strict";

const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*|__[^_\n]+__)|(\*[^*\s][^*\n]*\*)/g;
const LIST_ITEM = /^\s*(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/;

function renderInline(text, parent) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    let el;
    if (m[1]) {
      el = document.createElement("code");
      el.textContent = m[0].slice(1, -1);
    } else {
      el = document.createElement(m[2] ? "strong" : "em");
      renderInline(m[2] ? m[0].slice(2, -2) : m[0].slice(1, -1), el);
    }
    parent.append(el);
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

// A DocumentFragment for `text`; an unclosed code fence (a reply still streaming) runs to the end.
function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.split("\n");
  let list = null;
  let paragraph = null;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line.trimStart().startsWith("```")) {
      const code = [];
      for (i += 1; i < lines.length && !lines[i].trimStart().startsWith("```"); i++) code.push(lines[i]);
      const pre = document.createElement("pre");
      const el = document.createElement("code");
      el.textContent = code.join("\n");
      pre.append(el);
      root.append(pre);
      list = paragraph = null;
      continue;
    }
    const item = line.match(LIST_ITEM);
    if (item) {
      const tag = item[1] ? "UL" : "OL";
      if (!list || list.tagName !== tag) {
        list = document.createElement(tag);
        if (item[2] && item[2] !== "1") list.start = Number(item[2]);
        root.append(list);
      }
      const li = document.createElement("li");
      renderInline(item[3], li);
      list.append(li);
      paragraph = null;
      continue;
    }
    if (!line.trim()) {
      list = paragraph = null;
      continue;
    }
    if (paragraph) {
      paragraph.append(document.createElement("br"));
    } else {
      paragraph = document.createElement("p");
      root.append(paragraph);
      list = null;
    }
    renderInline(line.replace(/^#{1,6}\s+/, ""), paragraph);
  }
  return root;
}
