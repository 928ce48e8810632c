// The latency page: a canvas animation with the probe id painted in, sent with `probe: true`;
// each displayed output frame's id is read back and timed against its send time (same clock).

import { ControlChannel } from "./control.js";
import { fmt, spanColour, stageLabel } from "./hud.js";
import { LatencyRun, toCSV } from "./measure.js";
import { explainFailure, hideNotice, showNotice } from "./notice.js";
import { PatternSource } from "./pattern.js";
import { histogram, stackedBars, timeSeries } from "./plot.js";
import { MAX_ID, paint, read, stripHeight } from "./probe.js";
import { createPeer, endSession, iceFailure, lowestPlayoutDelay, offer, preferCodec, serverInfo, videoCodecs } from "./rtc.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  notice: $("notice"),
  duration: $("duration"),
  resolution: $("resolution"),
  fps: $("fps"),
  codec: $("codec"),
  mode: $("mode"),
  modeHint: $("mode-hint"),
  run: $("run"),
  cancel: $("cancel"),
  playout: $("playout"),
  codecUsed: $("codec-used"),
  serverInfo: $("server-info"),
  sourceSlot: $("source-slot"),
  output: $("output"),
  progress: $("progress"),
  series: $("series"),
  histogram: $("histogram"),
  breakdown: $("breakdown"),
  legend: $("legend"),
  clockNote: $("clock-note"),
  summary: $("summary"),
  summaryTable: $("summary-table"),
  dropsNote: $("drops-note"),
  downloadJson: $("download-json"),
  downloadCsv: $("download-csv"),
};

const DURATION_S = { min: 3, max: 300 }; // what a run takes, per path
const WARMUP_TIMEOUT_MS = 20000;
const GRACE_MS = 2000;
const BREAKDOWN_FRAMES = 150;

const page = { active: null, results: [], server: null, cancelled: false };
window.livediffLatency = page; // for the curious and the tests: read-only

function setStatus(name, text = name) {
  ui.status.dataset.state = name;
  ui.status.textContent = text;
}

/** The duration in seconds `text` asks for, or null outside DURATION_S. */
function parseDuration(text) {
  const value = Number(text);
  return text !== "" && Number.isFinite(value) && value >= DURATION_S.min && value <= DURATION_S.max ? value : null;
}

function settings() {
  const [width, height] = ui.resolution.value.split("x").map(Number);
  return {
    duration_s: parseDuration(ui.duration.value),
    width,
    height,
    fps: Number(ui.fps.value),
    codec: ui.codec.value || null,
    mode: ui.mode.value,
  };
}

// -- one measured session ------------------------------------------------------------------

/** A peer that sends the probe pattern and reads ids back, feeding `run`. */
class ProbeSession {
  constructor(run, config) {
    this.run = run;
    this.config = config;
    this.nextId = Math.floor(Math.random() * (MAX_ID / 2));
    this.warmup = new Set(); // ids sent before the first one came back
    this.measuring = false;
    this.sending = true;
    this.firstBack = null;
    this.reader = document.createElement("canvas").getContext("2d", { willReadFrequently: true });
  }

  async open() {
    const { width, height, fps, codec } = this.config;
    this.source = new PatternSource({
      width,
      height,
      fps,
      beforeSend: (ctx, w, h, now) => this.paintId(ctx, w, h, now),
    });
    const stream = this.source.start();
    this.source.canvas.setAttribute("aria-label", "sent frames");
    ui.sourceSlot.replaceChildren(this.source.canvas);
    const track = stream.getVideoTracks()[0];
    track.contentHint = "motion";

    this.pc = await createPeer();
    const transceiver = this.pc.addTransceiver(track, { direction: "sendrecv", streams: [stream] });
    if (codec) preferCodec(transceiver, codec, { only: true });
    this.control = new ControlChannel(this.pc, {
      stats: (message) => this.run.serverStats(message),
      close: () => this.onLost?.("the control channel closed"),
    });
    this.pc.addEventListener("track", (event) => {
      if (event.track.kind === "video") ui.output.srcObject = new MediaStream([event.track]);
    });
    this.pc.addEventListener("connectionstatechange", () => {
      if (this.pc && ["failed", "closed"].includes(this.pc.connectionState)) {
        this.onLost?.(iceFailure(this.pc) || "the connection failed");
      }
    });
    const params = { probe: true };
    if (this.run.label === "passthrough") params.passthrough = true;
    const answer = await offer(this.pc, params);
    if (!answer) throw new Error("the connection closed while connecting");
    this.sessionId = answer.session_id;
    this.playout = lowestPlayoutDelay(this.pc);
    this.watch();
  }

  paintId(ctx, w, h, now) {
    const id = this.nextId;
    this.nextId = (this.nextId + 1) % (MAX_ID + 1);
    paint(ctx, w, h, id);
    if (!this.sending) return; // after the run: painted, not counted
    if (this.measuring) this.run.sent(id, now);
    else this.warmup.add(id);
  }

  /** Reads the id of every displayed frame (requestVideoFrameCallback). */
  watch() {
    const video = ui.output;
    const onFrame = (_now, meta) => {
      if (!this.pc) return;
      const width = meta.width || video.videoWidth;
      const height = meta.height || video.videoHeight;
      const rows = stripHeight(height);
      let id = null;
      if (width && rows) {
        const canvas = this.reader.canvas;
        if (canvas.width !== width || canvas.height !== rows) {
          canvas.width = width;
          canvas.height = rows;
        }
        this.reader.drawImage(video, 0, 0, width, rows, 0, 0, width, rows);
        id = read(this.reader.getImageData(0, 0, width, rows).data, width, height);
      }
      if (this.measuring) {
        this.run.displayed(id, { ...meta, width, height, expectedDisplayTime: meta.expectedDisplayTime ?? _now });
      } else if (id != null && this.warmup.has(id)) {
        this.firstBack?.();
      }
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }

  /** Resolves when the first probe id comes back (the whole path is flowing); `stopWaiting(error)` rejects. */
  flowing() {
    return new Promise((resolve, reject) => {
      const finish = (error) => {
        clearTimeout(timer);
        this.firstBack = null;
        this.stopWaiting = null;
        if (error) reject(error);
        else resolve();
      };
      const timer = setTimeout(
        () => finish(new Error(`no probe frame came back in ${WARMUP_TIMEOUT_MS / 1000} s`)),
        WARMUP_TIMEOUT_MS,
      );
      this.firstBack = () => finish(null);
      this.stopWaiting = finish;
    });
  }

  startMeasuring() {
    this.run.start(performance.now());
    this.measuring = true;
  }

  stopSending() {
    this.sending = false;
    this.run.end(performance.now());
  }

  async codecInUse() {
    if (!this.pc) return null;
    const report = await this.pc.getStats();
    const names = [];
    report.forEach((s) => {
      if ((s.type === "outbound-rtp" || s.type === "inbound-rtp") && s.kind === "video" && s.codecId) {
        const codec = report.get(s.codecId);
        if (codec) names.push(`${s.type.startsWith("out") ? "up" : "down"} ${codec.mimeType.split("/")[1]}`);
      }
    });
    return names.sort().reverse().join(", ");
  }

  async close() {
    const { pc, sessionId } = this;
    this.pc = null;
    this.onLost = null;
    this.source?.stop();
    if (sessionId && pc && pc.connectionState !== "failed") await endSession(sessionId);
    this.control?.close();
    keepLastFrame(ui.output);
    pc?.close();
  }
}

/** Leaves the video's current frame on screen as its poster once its stream ends. */
function keepLastFrame(video) {
  if (!video.videoWidth) return;
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  video.poster = canvas.toDataURL("image/png");
  video.srcObject = null;
}

// -- a whole run ---------------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function measure(label, config, index, count) {
  const run = new LatencyRun({ label, settings: config });
  const session = new ProbeSession(run, config);
  page.active = session;
  const prefix = count > 1 ? `${label} (${index + 1}/${count}) · ` : "";
  let lostReason = null;
  session.onLost = (reason) => {
    lostReason = reason;
    session.stopWaiting?.(new Error(`connection lost: ${reason}`));
  };
  try {
    setStatus("connecting", `${prefix}connecting`);
    await session.open();
    ui.playout.textContent = session.playout;
    setStatus("connecting", `${prefix}waiting for the first frame`);
    await session.flowing();
    run.setClock(await session.control.syncClock());
    session.startMeasuring();
    const duration = config.duration_s * 1000;
    const started = performance.now();
    let codecShown = false;
    while (performance.now() - started < duration) {
      if (page.cancelled) break;
      if (lostReason) throw new Error(`connection lost: ${lostReason}`);
      const elapsed = performance.now() - started;
      setStatus("live", `${prefix}measuring ${Math.floor(elapsed / 1000)}/${config.duration_s} s`);
      ui.progress.style.width = `${(100 * (index + elapsed / duration)) / count}%`;
      render(run);
      if (!codecShown && elapsed > 1000) {
        ui.codecUsed.textContent = (await session.codecInUse()) || "—";
        codecShown = true;
      }
      await sleep(500);
    }
    session.stopSending();
    setStatus("live", `${prefix}collecting the last frames`);
    await sleep(GRACE_MS);
    render(run);
    run.playout = session.playout;
    return run;
  } finally {
    await session.close();
    page.active = null;
  }
}

async function runAll() {
  const config = settings();
  if (config.duration_s == null) {
    showNotice(ui.notice, {
      name: "duration",
      kind: "warn",
      title: "Choose a duration from 3 to 300 seconds",
      text: `${ui.duration.value || "An empty duration"} is not one: a run measures each path for 3 to 300 s.`,
    });
    ui.duration.focus();
    return;
  }
  const labels = config.mode === "compare" ? ["passthrough", "model"] : [config.mode];
  page.cancelled = false;
  page.results = [];
  hideNotice(ui.notice);
  ui.summary.hidden = true;
  setRunning(true);
  try {
    for (const [index, label] of labels.entries()) {
      const run = await measure(label, config, index, labels.length);
      page.results.push(run);
      if (page.cancelled) break;
    }
    ui.progress.style.width = "100%";
    showSummary(page.results, config);
    setStatus("idle", page.cancelled ? "stopped" : "done");
  } catch (error) {
    if (page.cancelled) {
      setStatus("idle", "stopped");
      if (page.results.length) showSummary(page.results, config);
      return;
    }
    setStatus("error", "failed");
    if (error?.name === "HttpError") {
      explainFailure(ui.notice, error, { again: () => runAll(), retryAutomatically: false });
    } else {
      showNotice(ui.notice, {
        name: "lost",
        kind: "error",
        title: "The run stopped",
        text: String(error?.message ?? error),
        actions: [{ label: "Run again", primary: true, onClick: () => runAll() }],
      });
    }
    if (page.results.length) showSummary(page.results, config);
  } finally {
    setRunning(false);
  }
}

function setRunning(running) {
  ui.run.disabled = running;
  ui.cancel.disabled = !running;
  for (const el of [ui.duration, ui.resolution, ui.fps, ui.codec, ui.mode]) el.disabled = running;
}

// -- live view -----------------------------------------------------------------------------

function render(run) {
  const s = run.summary();
  $("p50").textContent = fmt(s.p50_ms, 0);
  $("p95").textContent = fmt(s.p95_ms, 0);
  $("p99").textContent = fmt(s.p99_ms, 0);
  $("max").textContent = fmt(s.max_ms, 0);
  $("sent").textContent = String(s.sent);
  $("received").textContent = String(s.received);
  $("dropped").textContent = String(s.dropped_by_server ?? "—");
  $("lost").textContent = String(s.lost_on_the_way);
  $("unreadable").textContent = String(s.unreadable);

  const frames = [...run.frames.values()];
  const points = frames.map((f) => [(f.sent_ms - run.started) / 1000, f.g2g_ms]);
  timeSeries(ui.series, points, {
    duration: run.settings.duration_s,
    marks: [
      ["p50", s.p50_ms, "#3ecf8e"],
      ["p95", s.p95_ms, "#f5b041"],
    ],
  });
  histogram(ui.histogram, frames.map((f) => f.g2g_ms));

  const offset = run.clockOffset();
  const recent = frames.slice(-BREAKDOWN_FRAMES).map((f) => run.breakdown(f, offset)).filter(Boolean);
  stackedBars(ui.breakdown, recent);
  renderLegend(s.breakdown_mean_ms);
  ui.clockNote.textContent =
    offset == null
      ? "The split needs the server's clock, which it did not report; glass-to-glass above is exact."
      : "Engine stages and waits are timed on the server. The two network legs use the server's clock, " +
        `matched to this page's by pings over the data channel (best round trip ${run.clock.roundTripMs.toFixed(1)} ms).`;
}

function renderLegend(means) {
  const items = Object.entries(means).map(([name, ms]) => {
    const li = document.createElement("li");
    const swatch = document.createElement("i");
    swatch.style.background = spanColour(name);
    const value = document.createElement("b");
    value.textContent = `${ms.toFixed(1)} ms`;
    li.append(swatch, `${stageLabel(name)} `, value);
    return li;
  });
  ui.legend.replaceChildren(...items);
}

// -- summary and downloads -----------------------------------------------------------------

const SUMMARY_ROWS = [
  ["p50 glass-to-glass", "p50_ms", "ms"],
  ["p95", "p95_ms", "ms"],
  ["p99", "p99_ms", "ms"],
  ["max", "max_ms", "ms"],
  ["mean", "mean_ms", "ms"],
  ["frames sent", "sent"],
  ["frames shown", "received"],
  ["dropped by the server on purpose", "dropped_by_server"],
  ["· model busy (latest-only inbox)", "dropped_by_server_inbox"],
  ["· encoder busy (outbox)", "dropped_by_server_outbox"],
  ["lost on the way", "lost_on_the_way"],
  ["· before the server", "lost_before_server"],
  ["· after the server", "lost_after_server"],
  ["unreadable ids", "unreadable"],
  ["display time from arrival", "stale_display_predictions"],
  ["read back", "read_back_ratio", "%"],
];

function showSummary(runs, config) {
  const summaries = runs.map((r) => r.summary());
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  head.append(Object.assign(document.createElement("th"), { textContent: `${config.width}×${config.height} @ ${config.fps} fps` }));
  for (const s of summaries) head.append(Object.assign(document.createElement("th"), { textContent: s.label }));
  const body = table.createTBody();
  const stageNames = [...new Set(summaries.flatMap((s) => Object.keys(s.breakdown_mean_ms)))];
  const rows = [...SUMMARY_ROWS, ...stageNames.map((n) => [`· ${stageLabel(n)} (mean)`, n, "ms", true])];
  for (const [title, key, unit, stage] of rows) {
    const tr = body.insertRow();
    tr.insertCell().textContent = title;
    for (const s of summaries) {
      const value = stage ? s.breakdown_mean_ms[key] : s[key];
      const text = unit === "%" ? fmt(value * 100, 1, " %") : unit === "ms" ? fmt(value, 1, " ms") : String(value ?? "—");
      tr.insertCell().textContent = text;
    }
  }
  ui.summaryTable.replaceChildren(table);
  ui.dropsNote.textContent = summaries.every((s) => s.dropped_by_server == null)
    ? "This server does not say which frames it dropped on purpose: every frame that did not come back counts as lost."
    : "Dropped by the server: the model (or the encoder) was still busy when newer frames came, and the server " +
      "runs only the newest one (latest-only), so latency stays bounded; a lower frame rate or size drops fewer. " +
      "Lost on the way: never came back for another reason (the browser's encoder skipped it, the network or a " +
      "decoder lost it). Each frame's outcome is in the downloads.";
  ui.summary.hidden = false;
  ui.summary.dataset.runs = String(runs.length);
  ui.summary.scrollIntoView({ behavior: "smooth", block: "nearest" });
}

function report() {
  return {
    generated: new Date().toISOString(),
    user_agent: navigator.userAgent,
    server: page.server,
    codec: ui.codecUsed.textContent,
    runs: page.results.map((run) => ({
      label: run.label,
      settings: run.settings,
      playout: run.playout,
      summary: run.summary(),
      frames: run.rows(),
    })),
  };
}

function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = Object.assign(document.createElement("a"), { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

const stamp = () => new Date().toISOString().slice(0, 19).replaceAll(":", "-");

ui.downloadJson.addEventListener("click", () =>
  download(`livediff-latency-${stamp()}.json`, JSON.stringify(report(), null, 2), "application/json"),
);
ui.downloadCsv.addEventListener("click", () => {
  const rows = page.results.flatMap((run) => run.rows().map((row) => ({ run: run.label, ...row })));
  download(`livediff-latency-${stamp()}.csv`, toCSV(rows), "text/csv");
});

// -- start-up ------------------------------------------------------------------------------

ui.run.addEventListener("click", () => runAll());
ui.cancel.addEventListener("click", () => {
  page.cancelled = true;
  page.active?.stopWaiting?.(Object.assign(new Error("cancelled"), { name: "AbortError" }));
});
window.addEventListener("pagehide", () => {
  const session = page.active;
  if (session?.sessionId) endSession(session.sessionId, { keepalive: true });
  session?.pc?.close();
});

for (const name of videoCodecs()) ui.codec.append(new Option(name, name));

function offerModes(passthrough) {
  for (const option of ui.mode.options) {
    if (option.value !== "model") option.disabled = !passthrough;
  }
  ui.modeHint.textContent = passthrough
    ? "Passthrough skips the model: what the transport alone costs."
    : "This server offers no passthrough mode, so only the full pipeline can be measured.";
}

offerModes(false);
applyQuery(new URLSearchParams(location.search));
if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) {
  ui.run.disabled = true;
  showNotice(ui.notice, {
    name: "unsupported",
    kind: "error",
    title: "This browser cannot time displayed frames",
    text: "The latency page needs requestVideoFrameCallback (Chromium 83+, Safari 15.4+, Firefox 132+).",
  });
}
/** What the server runs; asked again every few seconds while it is still loading its model. */
function loadServerInfo() {
  serverInfo()
    .then((info) => {
      page.server = info;
      ui.serverInfo.textContent = [info.model, info.backend, info.device].filter(Boolean).join(" · ") || "ready";
      offerModes(info.features.includes("passthrough"));
    })
    .catch((error) => {
      ui.serverInfo.textContent = "not ready";
      setTimeout(loadServerInfo, (error?.retryAfter ?? 5) * 1000);
    });
}

loadServerInfo();

/** URL parameters preset the form; one the form cannot take is named, with the values it takes. */
function applyQuery(query) {
  const ignored = [];
  const duration = query.get("duration");
  if (duration != null) {
    if (parseDuration(duration) != null) ui.duration.value = String(parseDuration(duration));
    else ignored.push(`duration=${duration} (takes ${DURATION_S.min} to ${DURATION_S.max} seconds)`);
  }
  for (const key of ["resolution", "fps", "codec", "mode"]) {
    const value = query.get(key);
    if (value == null) continue;
    const options = [...ui[key].options];
    if (options.some((o) => o.value === value)) ui[key].value = value;
    else ignored.push(`${key}=${value} (takes ${options.map((o) => o.value || "empty").join(", ")})`);
  }
  if (!ignored.length) return;
  showNotice(ui.notice, {
    name: "params",
    kind: "warn",
    title: `The form did not take ${ignored.length === 1 ? "a URL parameter" : "some URL parameters"}`,
    text: `${ignored.join("; ")}. A run uses what the form shows.`,
  });
}

