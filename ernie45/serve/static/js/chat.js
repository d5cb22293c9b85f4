// The page: conversations (kept in the browser), streaming answers rendered as Markdown, attachments, voice
// messages, agent mode's tool calls, and the moderation view. Everything goes through the server's own API:
// /v1/chat/completions, /v1/documents/info and /v1/moderations/video.

import * as agent from "./agent.js";
import {acceptDropsAndPastes, fromFile, part, Recorder, trimmedWav} from "./attach.js";
import {setupModeration} from "./moderate.js";
import {events} from "./sse.js";
import {chip, download, el, markdown, stats} from "./render.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const MODEL = $("model").textContent;
let convs = store.load();
let current = null;
let pending = [];  // attachments waiting for the next message
let controller = null;  // the answer being streamed
let tools = JSON.parse(localStorage.getItem("ernie45-tools") || "[]");
const recorder = new Recorder();

// ---- plumbing -------------------------------------------------------------------------------------------
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h.Authorization = "Bearer " + $("key").value;
  return h;
}

async function request(path, body) {
  const resp = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body)});
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(data.error ? data.error.message : `HTTP ${resp.status}`);
  return data;
}

function notice(text) { $("notice").textContent = text || ""; }

function persist() {
  if (current) current.updated = Date.now();
  const problem = store.save(convs);
  if (problem) notice(problem);
  renderSidebar();
}

// ---- conversations --------------------------------------------------------------------------------------
function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren();
  const q = $("search").value;
  for (const c of [...convs].sort((a, b) => b.updated - a.updated)) {
    if (!store.matches(c, q)) continue;
    list.append(el("li", {"aria-current": String(current && c.id === current.id)},
      el("button", {type: "button", class: "open", text: c.title, title: c.title, onclick: () => openConv(c.id)}),
      el("button", {type: "button", class: "icon rename", "aria-label": `Rename ${c.title}`, text: "✎",
                    onclick: () => rename(c)}),
      el("button", {type: "button", class: "icon delete", "aria-label": `Delete ${c.title}`, text: "✕",
                    onclick: () => remove(c)})));
  }
}

function openConv(id) {
  if (controller) controller.abort();
  current = convs.find((c) => c.id === id) || null;
  localStorage.setItem("ernie45-current", current ? current.id : "");
  renderLog();
  renderSidebar();
  $("sidebar").classList.remove("open");
}

function newConv() {
  if (controller) controller.abort();
  current = null;
  localStorage.setItem("ernie45-current", "");
  renderLog();
  renderSidebar();
  $("text").focus();
}

function rename(c) {
  const title = prompt("Rename the conversation", c.title);
  if (title && title.trim()) { c.title = title.trim(); persist(); }
}

function remove(c) {
  if (!confirm(`Delete "${c.title}"?`)) return;
  convs = convs.filter((x) => x !== c);
  if (current === c) current = null;
  persist();
  renderLog();
}

// ---- the conversation's messages ------------------------------------------------------------------------
function toolResults(conv) {
  const out = {};
  for (const m of conv.messages) if (m.role === "tool") out[m.tool_call_id] = m.content;
  return out;
}

function renderLog() {
  const log = $("log");
  log.replaceChildren();
  if (!current) return;
  const results = toolResults(current);
  const lastAssistant = current.messages.map((m) => m.role).lastIndexOf("assistant");
  current.messages.forEach((m, i) => {
    if (m.role === "tool") return;  // shown on its call's card
    log.append(m.role === "user" ? userNode(m, i) : assistantNode(m, i, results, i === lastAssistant));
  });
  log.scrollTop = log.scrollHeight;
}

function userNode(m, i) {
  const node = el("article", {class: "msg user", "data-index": i}, el("div", {class: "who", text: "You"}));
  if (m.attachments && m.attachments.length) node.append(el("div", {class: "chips"}, ...m.attachments.map((a) => chip(a))));
  node.append(el("div", {class: "body text", text: m.content}));
  node.append(el("div", {class: "actions"}, el("button", {type: "button", class: "edit", text: "Edit",
                                                         onclick: () => editTurn(i, node)})));
  return node;
}

function assistantNode(m, i, results, last) {
  const node = el("article", {class: "msg assistant", "data-index": i}, el("div", {class: "who", text: "Model"}));
  if (m.reasoning) {
    node.append(el("details", {class: "reasoning"}, el("summary", {text: "Reasoning"}),
                   el("div", {class: "thought", text: m.reasoning})));
  }
  const body = el("div", {class: "body"});
  markdown(body, m.content);
  node.append(body);
  if (m.tool_calls && m.tool_calls.length) node.append(agent.callCards(m.tool_calls, results, tools, answerCall));
  if (m.stats) node.append(el("div", {class: "stats", text: stats(m.stats)}));
  const actions = el("div", {class: "actions"},
    el("button", {type: "button", class: "copy", text: "Copy", onclick: () => navigator.clipboard.writeText(m.content)}));
  if (last) actions.append(el("button", {type: "button", class: "regenerate", text: "Regenerate", onclick: regenerate}));
  node.append(actions);
  if (m.done !== false) node.dataset.done = "1";
  return node;
}

function editTurn(i, node) {
  const m = current.messages[i];
  const box = el("textarea", {class: "edit-box", rows: 3, "aria-label": "Edit your message"});
  box.value = m.content;
  const save = el("button", {type: "button", class: "save-edit", text: "Save and answer again", onclick: () => {
    m.content = box.value;
    current.messages = current.messages.slice(0, i + 1);
    persist();
    renderLog();
    complete();
  }});
  node.querySelector(".body").replaceWith(box);
  node.querySelector(".actions").replaceChildren(save, el("button", {type: "button", text: "Cancel", onclick: renderLog}));
  box.focus();
}

function regenerate() {
  const last = current.messages.map((m) => m.role).lastIndexOf("assistant");
  let cut = last;
  while (cut > 0 && current.messages[cut - 1].role === "assistant") cut--;
  current.messages = current.messages.slice(0, cut);
  persist();
  renderLog();
  complete();
}

// ---- asking ---------------------------------------------------------------------------------------------
function apiMessages(conv) {
  const lost = [];
  const out = conv.messages.map((m) => {
    if (m.role === "user") {
      const atts = (m.attachments || []).filter((a) => (a.url ? true : (lost.push(a.name), false)));
      if (!atts.length) return {role: "user", content: m.content};
      return {role: "user", content: [...atts.map(part), {type: "text", text: m.content}]};
    }
    if (m.role === "tool") return {role: "tool", tool_call_id: m.tool_call_id, content: m.content};
    const msg = {role: "assistant", content: m.content || ""};
    if (m.tool_calls && m.tool_calls.length) msg.tool_calls = m.tool_calls;
    return msg;
  });
  if (lost.length) notice(`Sent without ${lost.join(", ")}: the browser's storage did not keep them.`);
  return out;
}

async function send(ev) {
  if (ev) ev.preventDefault();
  const text = $("text").value.trim();
  if (recorder.recording) return notice("Stop the recording first (● Stop recording): it becomes an attachment.");
  if (controller || (!text && !pending.length)) return;
  if (!current) {
    current = store.create();
    current.title = store.titleFrom(text || pending.map((a) => a.name).join(", "));
    convs.push(current);
    localStorage.setItem("ernie45-current", current.id);
  }
  current.messages.push({role: "user", content: text, attachments: pending});
  pending = [];
  renderPending();
  $("text").value = "";
  notice("");
  persist();
  renderLog();
  await complete();
}

async function complete() {
  const conv = current;
  const m = {role: "assistant", content: "", reasoning: "", done: false, tool_calls: []};
  conv.messages.push(m);
  const body = {model: MODEL, messages: apiMessages({messages: conv.messages.slice(0, -1)}), stream: true,
                stream_options: {include_usage: true},
                chat_template_kwargs: {enable_thinking: $("thinking").checked}};
  if ($("agent").checked && tools.length) {
    body.tools = agent.openaiTools(tools);
    const choice = $("tool-choice").value;
    const afterResults = conv.messages.length > 1 && conv.messages[conv.messages.length - 2].role === "tool";
    body.tool_choice = afterResults && choice === "required" ? "auto" : choice;  // else it would call forever
  }
  controller = new AbortController();
  setBusy(true);
  renderLog();
  const node = () => $("log").querySelector(`.msg.assistant[data-index="${conv.messages.length - 1}"]`);
  const began = performance.now();
  let first = null;
  let finish = null;
  let usage = null;
  let frame = 0;
  const redraw = () => {
    frame = 0;
    const n = node();
    if (!n || conv !== current) return;
    markdown(n.querySelector(".body"), m.content);
    if (m.reasoning && !n.querySelector(".reasoning")) {
      n.querySelector(".who").after(el("details", {class: "reasoning", open: true}, el("summary", {text: "Reasoning"}),
                                       el("div", {class: "thought"})));
    }
    if (m.reasoning) n.querySelector(".thought").textContent = m.reasoning;
    $("log").scrollTop = $("log").scrollHeight;
  };
  try {
    for await (const chunk of events("/v1/chat/completions", body, headers(), controller.signal)) {
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      const d = choice.delta || {};
      if ((d.content || d.reasoning_content || d.tool_calls) && first === null) first = performance.now();
      if (d.content) m.content += d.content;
      if (d.reasoning_content) m.reasoning += d.reasoning_content;
      for (const tc of d.tool_calls || []) {
        const slot = (m.tool_calls[tc.index] ||= {id: tc.id, type: "function", function: {name: "", arguments: ""}});
        if (tc.id) slot.id = tc.id;
        if (tc.function && tc.function.name) slot.function.name += tc.function.name;
        if (tc.function && tc.function.arguments) slot.function.arguments += tc.function.arguments;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      if (!frame) frame = requestAnimationFrame(redraw);
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped by you";
    else {
      conv.messages.pop();
      if (conv === current) { renderLog(); $("log").append(el("div", {class: "msg error", role: "alert", text: "Error: " + e.message})); }
      controller = null;
      setBusy(false);
      persist();
      return;
    }
  }
  const end = performance.now();
  const generated = usage ? usage.completion_tokens : undefined;
  m.stats = {prompt_tokens: usage ? usage.prompt_tokens : undefined, completion_tokens: generated,
             seconds: (end - began) / 1000, finish_reason: finish,
             tokens_per_second: generated && first !== null && end > first ? (generated - 1) / ((end - first) / 1000) : 0};
  m.done = true;
  if (!m.tool_calls.length) delete m.tool_calls;
  if (!m.reasoning) delete m.reasoning;
  controller = null;
  setBusy(false);
  persist();
  if (conv === current) renderLog();
}

function answerCall(call, result) {
  current.messages.push({role: "tool", tool_call_id: call.id, name: call.function.name, content: result});
  persist();
  renderLog();
  const results = toolResults(current);
  const last = current.messages.map((x) => x.role).lastIndexOf("assistant");
  const open = (current.messages[last].tool_calls || []).filter((c) => results[c.id] === undefined);
  if (!open.length) complete();  // every call answered: the model goes on from the results
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

// ---- attachments ----------------------------------------------------------------------------------------
function renderPending() {
  const box = $("attachments");
  box.replaceChildren(...pending.map((a, i) => chip(a, () => { pending.splice(i, 1); renderPending(); })));
}

async function attach(files) {
  for (const f of files) {
    try {
      pending.push(await fromFile(f, request));
    } catch (e) {
      notice(e.message);
    }
  }
  renderPending();
}

async function toggleMic() {
  const mic = $("mic");
  try {
    if (!recorder.recording) {
      await recorder.start();
      mic.setAttribute("aria-pressed", "true");
      mic.textContent = "■ Stop recording";
    } else {
      mic.setAttribute("aria-pressed", "false");
      mic.textContent = "● Record";
      const recording = await recorder.stop();
      let file;
      try {
        file = await trimmedWav(recording, "voice message");
      } catch (e) {  // sent as recorded, and the user is told why
        notice(`The recording was sent untrimmed (${e.message}).`);
        file = new File([recording], "voice message." + (recording.type.split("/")[1] || "webm"), {type: recording.type});
      }
      await attach([file]);
    }
  } catch (e) {
    notice(e.message);
  }
}

// ---- agent tools ----------------------------------------------------------------------------------------
function renderTools() {
  $("tools-panel").hidden = !$("agent").checked;
  $("tool-list").replaceChildren(...tools.map((t, i) => el("li", {},
    el("code", {text: t.name}), ` — ${t.description || ""} `,
    el("button", {type: "button", "aria-label": `Remove the tool ${t.name}`, text: "×",
                  onclick: () => { tools.splice(i, 1); saveTools(); }}))));
  if (!tools.length) $("tool-list").append(el("li", {class: "small", text: "No tools yet: add one or use the examples."}));
}

function saveTools() {
  localStorage.setItem("ernie45-tools", JSON.stringify(tools));
  localStorage.setItem("ernie45-agent", $("agent").checked ? "1" : "");
  renderTools();
}

// ---- wiring ---------------------------------------------------------------------------------------------
function applyTheme() {
  const choice = $("theme").value;
  localStorage.setItem("ernie45-theme", choice);
  const dark = choice === "dark" || (choice === "auto" && matchMedia("(prefers-color-scheme: dark)").matches);
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  $("hl-dark").disabled = !dark;
  $("hl-light").disabled = dark;
}

function showTab(name) {
  for (const t of ["chat", "moderate"]) {
    $(`tab-${t}`).setAttribute("aria-selected", String(t === name));
    $(`${t}-view`).hidden = t !== name;
  }
}

$("form").addEventListener("submit", send);
$("text").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && controller) controller.abort();
  if (e.key.toLowerCase() === "o" && e.ctrlKey && e.shiftKey) { e.preventDefault(); newConv(); }
});
$("stop").onclick = () => controller && controller.abort();
$("file").onchange = () => { attach(Array.from($("file").files)); $("file").value = ""; };
$("mic").onclick = toggleMic;
acceptDropsAndPastes(document, (files) => { showTab("chat"); attach(files); });
$("new-chat").onclick = newConv;
$("search").oninput = renderSidebar;
$("export").onclick = () => download("ernie45-conversations.json", store.exportJSON(convs), "application/json");
$("import").onchange = async () => {
  const f = $("import").files[0];
  $("import").value = "";
  try {
    const incoming = store.parseImport(await f.text());
    const known = new Set(convs.map((c) => c.id));
    convs.push(...incoming.filter((c) => !known.has(c.id)));
    persist();
    notice(`Imported ${incoming.length} conversation(s).`);
  } catch (e) {
    notice(`${f.name}: ${e.message}`);
  }
};
$("open-sidebar").onclick = () => $("sidebar").classList.add("open");
$("close-sidebar").onclick = () => $("sidebar").classList.remove("open");
$("key").value = localStorage.getItem("ernie45-key") || "";
$("key").onchange = () => localStorage.setItem("ernie45-key", $("key").value);
$("theme").value = localStorage.getItem("ernie45-theme") || "auto";
$("theme").onchange = applyTheme;
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", applyTheme);
$("agent").checked = !!localStorage.getItem("ernie45-agent");
$("agent").onchange = saveTools;
$("example-tools").onclick = () => {
  const names = new Set(tools.map((t) => t.name));
  tools.push(...agent.EXAMPLE_TOOLS.filter((t) => !names.has(t.name)));
  saveTools();
};
$("add-tool").onclick = () => {
  try {
    tools.push(agent.defineTool($("tool-name").value, $("tool-description").value, $("tool-parameters").value));
    $("tool-name").value = "";
    $("tool-description").value = "";
    notice("");
    saveTools();
  } catch (e) {
    notice(e.message);
  }
};
$("tab-chat").onclick = () => showTab("chat");
$("tab-moderate").onclick = () => showTab("moderate");
setupModeration(MODEL, headers);

applyTheme();
renderTools();
current = convs.find((c) => c.id === localStorage.getItem("ernie45-current")) || null;
renderSidebar();
renderLog();
window.ernie45 = {ready: true};  // for tests and scripts driving the page
