// Conversations kept in the browser (localStorage): listed, renamed, deleted, searched, exported and imported.
// A conversation: {id, title, created, updated, messages: [{role, content, attachments?, reasoning?, stats?,
// tool_calls?, tool_call_id?, name?}], tools: [...]}. When the browser's storage is full, the attachments of the
// oldest conversations are let go (their names stay, marked "not kept") and the page says so.

const KEY = "ernie45-conversations";

export function load() {
  try {
    const list = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

// Saves `list`; returns a sentence for the user when something could not be kept (else "").
export function save(list) {
  const sorted = [...list].sort((a, b) => a.updated - b.updated);  // oldest first: they lose attachments first
  for (let attempt = 0; ; attempt++) {
    try {
      localStorage.setItem(KEY, JSON.stringify(list));
      return attempt ? "The browser's storage is full: the attachments of older conversations were not kept " +
                       "(their names stay)." : "";
    } catch (e) {
      const victim = sorted.find((c) => c.messages.some((m) => (m.attachments || []).some((a) => a.url)));
      if (!victim) return "The browser's storage is full: this conversation could not be saved (" + e.name + ").";
      for (const m of victim.messages) for (const a of m.attachments || []) if (a.url) { a.url = null; a.lost = true; }
    }
  }
}

export function create() {
  const now = Date.now();
  return {id: now.toString(36) + Math.random().toString(36).slice(2, 7), title: "New chat", created: now,
          updated: now, messages: []};
}

export function titleFrom(text) {
  const t = (text || "").replace(/\s+/g, " ").trim();
  return t ? (t.length > 48 ? t.slice(0, 47) + "…" : t) : "New chat";
}

export function matches(conv, query) {
  const q = query.trim().toLowerCase();
  if (!q) return true;
  return conv.title.toLowerCase().includes(q) ||
    conv.messages.some((m) => typeof m.content === "string" && m.content.toLowerCase().includes(q));
}

export function exportJSON(list) {
  return JSON.stringify({format: "ernie45-conversations", version: 1, conversations: list}, null, 1);
}

// The conversations in an exported file, checked; throws an Error that says what is wrong.
export function parseImport(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new Error("not a JSON file (" + e.message + ")");
  }
  const list = Array.isArray(data) ? data : data && data.conversations;
  if (!Array.isArray(list)) throw new Error("not an export of ernie45 conversations (no conversations list)");
  for (const c of list) {
    if (!c || typeof c.id !== "string" || !Array.isArray(c.messages)) {
      throw new Error("a conversation without an id or messages");
    }
    c.title = typeof c.title === "string" ? c.title : "Imported chat";
    c.updated = Number(c.updated) || Date.now();
    c.created = Number(c.created) || c.updated;
  }
  return list;
}
