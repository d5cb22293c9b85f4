// Answers as Markdown: marked renders, DOMPurify removes anything executable (scripts, event handlers,
// javascript: links), highlight.js colours code blocks, KaTeX typesets math ($...$, $$...$$, \(...\), \[...\]).
// All four ship inside the package (static/vendor).

/* global marked, DOMPurify, hljs, katex */

marked.setOptions({gfm: true, breaks: true});

// Math outside code spans and blocks: display first, then inline ($ followed by a non-space, as in "$x$", so that
// "$5 and $6" stays text).
const MATH = /(```[\s\S]*?```|`[^`\n]*`)|\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\]|\\\(([\s\S]+?)\\\)|\$(?=\S)([^$\n]*?\S)\$/g;

export function markdown(el, text) {
  const formulas = [];
  const source = (text || "").replace(MATH, (all, code, display, display2, inline, inline2) => {
    if (code) return code;
    const block = display !== undefined || display2 !== undefined;
    formulas.push({tex: display ?? display2 ?? inline ?? inline2, display: block});
    return `@@MATH${formulas.length - 1}@@`;
  });
  el.innerHTML = DOMPurify.sanitize(marked.parse(source), {FORBID_TAGS: ["style", "form", "input"]});
  for (const a of el.querySelectorAll("a[href]")) { a.target = "_blank"; a.rel = "noopener noreferrer"; }
  for (const code of el.querySelectorAll("pre code")) hljs.highlightElement(code);
  if (formulas.length) typeset(el, formulas);
}

// Placeholders -> KaTeX's HTML (trust off: no links, no raw HTML from the formula; an error shows the source).
function typeset(el, formulas) {
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  const nodes = [];
  while (walker.nextNode()) if (walker.currentNode.nodeValue.includes("@@MATH")) nodes.push(walker.currentNode);
  for (const node of nodes) {
    const frag = document.createDocumentFragment();
    for (const piece of node.nodeValue.split(/(@@MATH\d+@@)/)) {
      const m = piece.match(/^@@MATH(\d+)@@$/);
      if (!m || !formulas[Number(m[1])]) { frag.append(piece); continue; }
      const f = formulas[Number(m[1])];
      const span = document.createElement("span");
      span.innerHTML = katex.renderToString(f.tex, {displayMode: f.display, throwOnError: false, trust: false});
      frag.append(span);
    }
    node.replaceWith(frag);
  }
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

const KIND_LABEL = {image: "image", video: "video", audio: "audio", file: "file"};

// An attachment as a chip: a thumbnail for pictures, a player for audio and video, the page count for a PDF.
export function chip(att, onRemove) {
  const c = el("span", {class: "chip" + (att.lost ? " lost" : ""), "data-kind": att.kind});
  if (att.lost) {
    c.append(el("span", {text: `${att.name} (not kept: browser storage was full)`}));
  } else if (att.kind === "image") {
    c.append(el("img", {src: att.url, alt: att.name}));
  } else if (att.kind === "video") {
    c.append(el("video", {src: att.url, controls: true, "aria-label": att.name}));
  } else if (att.kind === "audio") {
    c.append(el("audio", {src: att.url, controls: true, "aria-label": att.name}));
  }
  if (!att.lost) {
    let info = att.name;
    if (att.pages) info += ` · ${att.pages} page${att.pages > 1 ? "s" : ""}`;
    if (att.sheets) info += ` · ${att.sheets} sheet${att.sheets > 1 ? "s" : ""}`;
    if (att.tokens) info += ` · ${att.tokens} tokens`;
    c.append(el("span", {class: "name", text: info}));
  }
  if (onRemove) c.append(el("button", {type: "button", "aria-label": `Remove ${att.name}`, text: "×", onclick: onRemove}));
  c.title = KIND_LABEL[att.kind] || "";
  return c;
}

export function stats(s) {
  if (!s) return "";
  const parts = [];
  if (s.prompt_tokens !== undefined) parts.push(`${s.prompt_tokens} prompt tokens`);
  if (s.completion_tokens !== undefined) parts.push(`${s.completion_tokens} generated`);
  if (s.tokens_per_second) parts.push(`${s.tokens_per_second.toFixed(1)} tok/s`);
  if (s.seconds) parts.push(`${s.seconds.toFixed(1)} s`);
  const why = {length: "cut at max_tokens", tool_calls: "called a tool"}[s.finish_reason] || s.finish_reason;
  if (s.finish_reason && s.finish_reason !== "stop") parts.push(why);
  return parts.join(" · ");
}

// Saves `text` as a file through the browser's download.
export function download(name, text, type) {
  const a = el("a", {href: URL.createObjectURL(new Blob([text], {type})), download: name});
  document.body.append(a);
  a.click();
  a.remove();
}
