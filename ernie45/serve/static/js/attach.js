// Attachments: files from the picker, drag-and-drop or paste, and voice messages recorded with the microphone
// (MediaRecorder). Each becomes {kind, name, mime, url (a data: URL), pages?, sheets?, tokens?} and, when sent,
// the server's part for it: image_url, video_url, input_audio or file (PDF, CSV, spreadsheets, text).

const DOCUMENT = /\.(pdf|csv|tsv|txt|md|json|xlsx)$/i;

export function kindOf(file) {
  const t = file.type || "";
  if (t.startsWith("image/")) return "image";
  if (t.startsWith("video/")) return "video";
  if (t.startsWith("audio/")) return "audio";
  if (t === "application/pdf" || t.startsWith("text/") || DOCUMENT.test(file.name)) return "file";
  return null;
}

export function readDataURL(blob) {
  return new Promise((ok, fail) => {
    const r = new FileReader();
    r.onload = () => ok(r.result);
    r.onerror = () => fail(r.error);
    r.readAsDataURL(blob);
  });
}

const AUDIO_FORMATS = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/mpeg": "mp3",
                       "audio/mp3": "mp3", "audio/ogg": "ogg", "audio/webm": "webm", "audio/flac": "flac",
                       "audio/mp4": "m4a", "audio/x-m4a": "m4a"};

// An attachment from a File; documents are measured by the server (pages, tokens) so the chip can say so.
export async function fromFile(file, request) {
  const kind = kindOf(file);
  if (!kind) throw new Error(`${file.name}: ${file.type || "this kind of file"} cannot be attached ` +
                             "(images, video, audio, PDF, CSV/TSV, xlsx and text files can)");
  if (kind === "audio" && !AUDIO_FORMATS[file.type.split(";")[0]]) {
    throw new Error(`${file.name}: ${file.type} audio cannot be sent (WAV, MP3, FLAC, OGG, WebM and M4A can)`);
  }
  const url = await readDataURL(file);
  const att = {kind, name: file.name || `${kind}`, mime: file.type || "application/octet-stream", url};
  if (kind === "file") {
    const info = await request("/v1/documents/info", {file_data: url, filename: att.name});
    Object.assign(att, {pages: info.pages, sheets: info.sheets, tokens: info.tokens, doc: info.kind});
  }
  return att;
}

// The server's content part for an attachment (a video with its sound for a model that hears).
export function part(att) {
  if (att.kind === "image") return {type: "image_url", image_url: {url: att.url}};
  if (att.kind === "video") {
    return {type: "video_url", video_url: {url: att.url, ...(document.body.dataset.hears ? {use_audio: true} : {})}};
  }
  if (att.kind === "audio") {
    const mime = att.mime.split(";")[0];
    return {type: "input_audio", input_audio: {data: att.url.split(",")[1], format: AUDIO_FORMATS[mime]}};
  }
  return {type: "file", file: {file_data: att.url, filename: att.name}};
}

// Files dropped anywhere on the page, or pasted into it, go to `add(files)`.
export function acceptDropsAndPastes(target, add) {
  let depth = 0;
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  target.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth++;
    document.body.classList.add("dragging");
  });
  target.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  target.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) document.body.classList.remove("dragging");
  });
  target.addEventListener("drop", (e) => {
    depth = 0;
    document.body.classList.remove("dragging");
    if (!e.dataTransfer || !e.dataTransfer.files.length) return;
    e.preventDefault();
    add(Array.from(e.dataTransfer.files));
  });
  target.addEventListener("paste", (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []);
    if (files.length) {
      e.preventDefault();
      add(files);
    }
  });
}

// A recording as 16 kHz mono WAV, cut to the speech: the silence before and after it (the time to reach the
// button) goes, keeping 60 ms on each side. The embedded demo model misreads a clip padded with 0.3 s of silence.
export async function trimmedWav(blob, name) {
  const ctx = new OfflineAudioContext(1, 1, 16000);
  const decoded = await ctx.decodeAudioData(await blob.arrayBuffer());
  const render = new OfflineAudioContext(1, Math.ceil(decoded.duration * 16000), 16000);
  const src = render.createBufferSource();
  src.buffer = decoded;
  src.connect(render.destination);
  src.start();
  const x = (await render.startRendering()).getChannelData(0);
  const frame = 160;  // 10 ms
  const rms = [];
  for (let i = 0; i + frame <= x.length; i += frame) {
    let e = 0;
    for (let j = i; j < i + frame; j++) e += x[j] * x[j];
    rms.push(Math.sqrt(e / frame));
  }
  const loud = Math.max(...rms, 0);
  const threshold = Math.max(0.004, 0.15 * loud);
  const first = rms.findIndex((r) => r > threshold);
  const last = rms.length - 1 - [...rms].reverse().findIndex((r) => r > threshold);
  if (first < 0) throw new Error("the recording is silent: is the microphone muted?");
  const begin = Math.max(0, (first - 6) * frame), end = Math.min(x.length, (last + 7) * frame);
  const pcm = x.subarray(begin, end);
  const out = new DataView(new ArrayBuffer(44 + 2 * pcm.length));
  const text = (at, s) => [...s].forEach((c, i) => out.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF"); out.setUint32(4, 36 + 2 * pcm.length, true); text(8, "WAVEfmt ");
  out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, 16000, true); out.setUint32(28, 32000, true); out.setUint16(32, 2, true);
  out.setUint16(34, 16, true); text(36, "data"); out.setUint32(40, 2 * pcm.length, true);
  pcm.forEach((v, i) => out.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, v)) * 32767, true));
  const seconds = (pcm.length / 16000).toFixed(1);
  return new File([out.buffer], `${name} (${seconds} s).wav`, {type: "audio/wav"});
}

// The microphone: start() asks for it and records; stop() resolves to the recording as a File (webm/opus or
// what the browser records).
export class Recorder {
  constructor() { this.recorder = null; this.chunks = []; }

  get recording() { return !!this.recorder; }

  async start() {
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      throw new Error("this browser cannot record audio here (recording needs https or localhost)");
    }
    let stream;
    try {
      // the voice as the microphone hears it: the call-oriented processing (echo cancellation, noise suppression,
      // automatic gain) reshapes speech the model was not trained on and cost the demo a digit in three
      stream = await navigator.mediaDevices.getUserMedia(
        {audio: {echoCancellation: false, noiseSuppression: false, autoGainControl: false}});
    } catch (e) {
      throw new Error("the microphone is not available: " + (e.message || e.name));
    }
    this.chunks = [];
    this.recorder = new MediaRecorder(stream);
    this.recorder.ondataavailable = (e) => { if (e.data.size) this.chunks.push(e.data); };
    this.started = Date.now();
    this.recorder.start(250);
  }

  stop() {
    const rec = this.recorder;
    this.recorder = null;
    return new Promise((ok) => {
      rec.onstop = () => {
        rec.stream.getTracks().forEach((t) => t.stop());
        const type = (rec.mimeType || "audio/webm").split(";")[0];
        ok(new Blob(this.chunks, {type}));
      };
      rec.stop();
    });
  }
}
