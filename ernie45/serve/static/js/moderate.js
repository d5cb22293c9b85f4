// The moderation view: a video and a policy go to POST /v1/moderations/video; windows stream back as they are
// judged and are laid on a timeline under the player (thumbnail, labels, confidence). A window is a button:
// it seeks the player there. The verdicts export as JSON Lines.

import {el} from "./render.js";

export function fmtTime(s) {
  return `${Math.floor(s / 60)}:${(s % 60).toFixed(1).padStart(4, "0")}`;
}

export class Timeline {
  constructor(box, player, detail) {
    this.box = box; this.player = player; this.detail = detail; this.windows = [];
  }

  clear() { this.windows = []; this.box.replaceChildren(); this.detail.textContent = ""; }

  get duration() {
    const d = this.player.duration;
    const last = this.windows.length ? this.windows[this.windows.length - 1].end : 0;
    return Math.max(Number.isFinite(d) ? d : 0, last) || 1;
  }

  add(w) {
    this.windows.push(w);
    this.layout();
  }

  layout() {
    const total = this.duration;
    this.box.replaceChildren();
    this.windows.forEach((w, i) => {
      const flagged = w.labels.length > 0;
      const label = flagged ? w.labels.join(", ") : "clear";
      const text = `${fmtTime(w.start)}–${fmtTime(w.end)}: ${label}, confidence ${Math.round(w.confidence * 100)}%`;
      const b = el("button", {type: "button", role: "listitem", class: "window" + (flagged ? " flagged" : ""),
                              "data-start": w.start, "data-index": i, "aria-label": text, title: text,
                              onclick: () => this.select(i)});
      b.style.left = `${(100 * w.start) / total}%`;
      b.style.width = `${(100 * (w.end - w.start)) / total}%`;
      if (w.thumbnail) b.append(el("img", {src: w.thumbnail, alt: ""}));
      b.append(el("span", {class: "labels", text: label}), el("span", {text: `${Math.round(w.confidence * 100)}%`}));
      this.box.append(b);
    });
  }

  select(i) {
    const w = this.windows[i];
    this.player.currentTime = w.start;
    for (const b of this.box.children) b.setAttribute("aria-current", String(Number(b.dataset.index) === i));
    this.detail.textContent = `${fmtTime(w.start)}–${fmtTime(w.end)}: ` +
      (w.labels.length ? w.labels.join(", ") : "no category") + (w.evidence ? ` — “${w.evidence}”` : "") +
      (w.error ? ` (${w.error})` : "");
  }

  jsonLines() {
    return this.windows.map(({thumbnail, object, ...v}) => JSON.stringify(v)).join("\n") + "\n";
  }
}

// Streams the windows of `body` from the server into `onWindow`; resolves to the summary.
export async function screen(body, headers, signal, onWindow) {
  const resp = await fetch("/v1/moderations/video", {method: "POST", headers, body: JSON.stringify(body), signal});
  if (!resp.ok) {
    const e = await resp.json().catch(() => ({}));
    throw new Error(e.error ? e.error.message : `HTTP ${resp.status}`);
  }
  let summary = null;
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, at).trim();
      buf = buf.slice(at + 2);
      if (!line.startsWith("data:") || line.slice(5).trim() === "[DONE]") continue;
      const item = JSON.parse(line.slice(5));
      if (item.error) throw new Error(item.error.message);
      if (item.object === "moderation.window") onWindow(item);
      else if (item.object === "moderation.summary") summary = item;
    }
  }
  return summary;
}
