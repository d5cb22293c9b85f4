// Server-sent events from a POST (the OpenAI streaming shape): each `data:` line's JSON, in order, until
// `data: [DONE]`. An HTTP error or an error event is thrown as an Error with the server's message.

export async function* events(path, body, headers, signal) {
  const resp = await fetch(path, {method: "POST", headers, body: JSON.stringify(body), signal});
  if (!resp.ok) {
    const e = await resp.json().catch(() => ({}));
    throw new Error(e.error ? e.error.message : `HTTP ${resp.status}`);
  }
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += dec.decode(value, {stream: true});
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, at).trim();
      buf = buf.slice(at + 2);
      if (!line.startsWith("data:") || line.slice(5).trim() === "[DONE]") continue;
      const item = JSON.parse(line.slice(5));
      if (item.error) throw new Error(item.error.message);
      yield item;
    }
  }
}
