// The moderation view: a video and a policy go to POST /v1/moderations/video; windows stream back as they are
// judged and are laid on a timeline under the player (thumbnail, labels, confidence). A window is a button:
// it seeks the player there. The verdicts export as JSON Lines.

import {readDataURL} from "./attach.js";
import {download, el} from "./render.js";
import {events} from "./sse.js";

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
      const b = el("button", {type: "button", "aria-label": text, title: text, onclick: () => this.select(i)});
      if (w.thumbnail) b.append(el("img", {src: w.thumbnail, alt: ""}));
      b.append(el("span", {class: "labels", text: label}), el("span", {text: `${Math.round(w.confidence * 100)}%`}));
      const item = el("li", {class: "window" + (flagged ? " flagged" : ""), "data-start": w.start, "data-index": i}, b);
      item.style.left = `${(100 * w.start) / total}%`;
      item.style.width = `${(100 * (w.end - w.start)) / total}%`;
      this.box.append(item);
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
  let summary = null;
  for await (const item of events("/v1/moderations/video", body, headers, signal)) {
    if (item.object === "moderation.window") onWindow(item);
    else if (item.object === "moderation.summary") summary = item;
  }
  return summary;
}

// The view's controls: pick a video and a policy, screen, stop, export.
export function setupModeration(model, headers) {
  const $ = (id) => document.getElementById(id);
  const timeline = new Timeline($("timeline"), $("mod-player"), $("mod-detail"));
  let modController = null;

  async function moderate(ev) {
    ev.preventDefault();
    const file = $("mod-video").files[0];
    const status = $("mod-status");
    try {
      if (!file) throw new Error("choose a video first");
      const policy = $("mod-policy").value;  // YAML or JSON text: the server reads it as a policy file
      if (!policy.trim()) throw new Error("write a policy first: one category a line, name: what it covers");
      const url = await readDataURL(file);
      timeline.clear();
      modController = new AbortController();
      $("mod-stop").hidden = false;
      $("mod-export").disabled = true;
      status.textContent = "Screening…";
      const body = {model, video: url, policy, window: Number($("mod-window").value) || 2};
      const summary = await screen(body, headers(), modController.signal, (w) => {
        timeline.add(w);
        status.textContent = `${timeline.windows.length} windows judged`;
      });
      const flagged = summary ? summary.flagged.length : 0;
      status.textContent = `Done: ${timeline.windows.length} windows, ${flagged} flagged.`;
    } catch (e) {
      status.textContent = e.name === "AbortError" ? `Stopped after ${timeline.windows.length} windows.` : "Error: " + e.message;
    }
    modController = null;
    $("mod-stop").hidden = true;
    $("mod-export").disabled = !timeline.windows.length;
  }

  $("moderate-form").addEventListener("submit", moderate);
  $("mod-stop").onclick = () => modController && modController.abort();
  $("mod-export").onclick = () => download("verdicts.jsonl", timeline.jsonLines(), "application/x-ndjson");
  $("mod-video").onchange = () => {
    const f = $("mod-video").files[0];
    if (f) $("mod-player").src = URL.createObjectURL(f);
  };
  $("mod-player").addEventListener("loadedmetadata", () => timeline.layout());
  $("mod-policy-file").onchange = async () => { $("mod-policy").value = await $("mod-policy-file").files[0].text(); };
}
