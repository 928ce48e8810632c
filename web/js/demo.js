// The demo page: camera (or test pattern) -> POST /offer -> transformed video back, live controls, HUD.

import { ControlChannel } from "./control.js";
import { Controls } from "./controls.js";
import {
  QUALITY_TITLE,
  RtcStats,
  ServerTimings,
  fmt,
  qualityText,
  renderStats,
  stackBar,
  stageLabel,
} from "./hud.js";
import { cameraProblem, explainFailure, hideNotice, showNotice } from "./notice.js";
import { PatternSource } from "./pattern.js";
import { HttpError, createPeer, endSession, getJSON, iceFailure, lowestPlayoutDelay, offer, serverInfo } from "./rtc.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  notice: $("notice"),
  input: $("input"),
  output: $("output"),
  inputPlaceholder: $("input-placeholder"),
  outputPlaceholder: $("output-placeholder"),
  hud: $("hud"),
  start: $("start"),
  startPattern: $("start-pattern"),
  stop: $("stop"),
  sessionLabel: $("session-label"),
};

const LOST_AFTER_MS = 4000;
const CONTROL_STAGES = ["canny", "depth", "previous", "controlnet"];

/** What the page is doing now; one at a time. */
const state = {
  source: null, // "camera" | "pattern"
  localStream: null,
  pattern: null,
  pc: null,
  control: null,
  sessionId: null,
  stopping: false,
  timers: [],
  cancelRetry: null,
  server: null, // {model, backend, device, ...} when the server says
  outputFrames: 0,
  run: 0, // bumped by every start and stop: a start that was overtaken drops what it made
  starting: null, // the latest start's promise (see start)
};
// For tests and the curious: the live numbers, read-only.
window.livediff = { state, get outputFrames() { return state.outputFrames; } };

const controls = new Controls(document, (changes) => state.control?.send(changes));

function setStatus(name, text = name) {
  ui.status.dataset.state = name;
  ui.status.textContent = text;
}

// -- sources -------------------------------------------------------------------------------

/** The camera or test pattern as a MediaStream; null when a newer start or a stop came meanwhile. */
async function openSource(kind, run) {
  if (state.localStream && state.source === kind && state.localStream.getVideoTracks()[0]?.readyState === "live") {
    return state.localStream;
  }
  closeSource();
  if (kind === "pattern") {
    state.pattern = new PatternSource({ width: 640, height: 480, fps: 30 });
    state.localStream = state.pattern.start();
  } else {
    if (!navigator.mediaDevices?.getUserMedia) throw Object.assign(new Error("no mediaDevices"), { name: "TypeError" });
    const stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } },
      audio: false,
    });
    if (run !== state.run) {
      stream.getTracks().forEach((t) => t.stop()); // the user moved on while the browser asked
      return null;
    }
    state.localStream = stream;
  }
  state.source = kind;
  ui.input.srcObject = state.localStream;
  ui.input.classList.toggle("mirror", kind === "camera");
  ui.output.classList.toggle("mirror", kind === "camera");
  ui.inputPlaceholder.hidden = true;
  return state.localStream;
}

function closeSource() {
  state.pattern?.stop();
  state.pattern = null;
  state.localStream?.getTracks().forEach((t) => t.stop());
  state.localStream = null;
  ui.input.srcObject = null;
  ui.inputPlaceholder.hidden = false;
}

// -- the session ---------------------------------------------------------------------------

/** Starts a session from `kind` ("camera" or "pattern"); `state.starting` is the latest start's
 * promise, settled once that start is live, failed or overtaken and has ended what it set up. */
function start(kind) {
  state.starting = begin(kind);
  return state.starting;
}

async function begin(kind) {
  const run = ++state.run;
  cancelRetry();
  await disconnect();
  if (run !== state.run) return;
  hideNotice(ui.notice);
  setButtons("connecting");
  setStatus("connecting", kind === "camera" ? "starting camera" : "starting");
  let stream;
  try {
    stream = await openSource(kind, run);
  } catch (error) {
    if (run !== state.run) return;
    const { title, text } = cameraProblem(error);
    showNotice(ui.notice, {
      name: "camera",
      kind: "warn",
      title,
      text,
      actions: [
        { label: "Use test pattern", primary: true, onClick: () => start("pattern") },
        { label: "Try camera again", onClick: () => start("camera") },
      ],
    });
    setStatus("error", "no camera");
    setButtons("idle");
    return;
  }
  if (!stream || run !== state.run) return;
  await connect(stream, run);
}

async function connect(stream, run) {
  setStatus("connecting", "connecting");
  let pc;
  try {
    pc = await createPeer(); // asks the server for its STUN/TURN servers
  } catch (error) {
    if (run !== state.run) return;
    setButtons("idle");
    failed(error, () => connectAgain());
    return;
  }
  if (run !== state.run) {
    pc.close();
    return;
  }
  state.pc = pc;
  state.stopping = false;
  pc.addTransceiver(stream.getVideoTracks()[0], { direction: "sendrecv", streams: [stream] });
  const timings = new ServerTimings();
  state.control = new ControlChannel(pc, {
    ack: (message, sent) => controls.acknowledged(message, sent),
    error: (message, sent) => controls.rejected(message, sent),
    stats: (message) => timings.add(message),
    other: (message) => message.type === "controlnet" && controls.controlnet.loaded(message),
    close: () => lost("the control channel closed"),
  });
  pc.addEventListener("track", (event) => {
    if (event.track.kind !== "video") return;
    ui.output.srcObject = new MediaStream([event.track]);
  });
  pc.addEventListener("connectionstatechange", () => onConnectionState(pc));

  let answer;
  try {
    answer = await offer(pc, controls.values());
  } catch (error) {
    if (state.pc !== pc) return; // a stop or a newer start took over while signalling
    await disconnect();
    failed(error, () => connectAgain());
    return;
  }
  if (!answer || state.pc !== pc) {
    pc.close();
    if (answer) await endSession(answer.session_id); // overtaken while signalling: end what the server set up
    return;
  }
  controls.markSent();
  state.sessionId = answer.session_id;
  state.playout = lowestPlayoutDelay(pc);
  ui.sessionLabel.textContent = `session ${answer.session_id}`;
  controls.controlnet.follow(answer.session_id);
  controls.imagePrompt.follow(answer.session_id);
  setButtons("live");
  watchOutput();
  startHud(pc, timings);
  loadServerInfo(); // the server may have restarted with other settings since the page loaded
}

async function connectAgain() {
  const kind = state.source ?? "camera";
  await start(kind);
}

function onConnectionState(pc) {
  if (state.pc !== pc) return;
  if (pc.connectionState === "connected") {
    setStatus("live", "live");
    hideNotice(ui.notice);
    clearTimeout(state.lostTimer);
  } else if (pc.connectionState === "failed") {
    lost(iceFailure(pc) || "the connection failed");
  } else if (pc.connectionState === "disconnected") {
    clearTimeout(state.lostTimer);
    state.lostTimer = setTimeout(() => {
      if (state.pc === pc && pc.connectionState !== "connected") lost("no media for a few seconds");
    }, LOST_AFTER_MS);
  }
}

function lost(reason) {
  if (state.stopping || !state.pc) return;
  const kind = state.source;
  disconnect({ tellServer: false }).then(() => {
    setStatus("error", "disconnected");
    showNotice(ui.notice, {
      name: "lost",
      kind: "error",
      title: "Connection lost",
      text: `The link to the server ended (${reason}). Your settings are kept; reconnecting starts a new session.`,
      actions: [{ label: "Reconnect", primary: true, onClick: () => start(kind ?? "camera") }],
    });
  });
}

/** Ends the session on the server, then closes the peer. Safe to call twice. */
async function disconnect({ keepSource = true, tellServer = true } = {}) {
  const { pc, control, sessionId } = state;
  state.stopping = true;
  state.pc = null;
  state.control = null;
  state.sessionId = null;
  for (const timer of state.timers) clearInterval(timer);
  state.timers = [];
  clearTimeout(state.lostTimer);
  if (tellServer && sessionId && pc && pc.connectionState !== "failed") await endSession(sessionId);
  control?.close();
  pc?.close();
  ui.output.srcObject = null;
  ui.outputPlaceholder.hidden = false;
  ui.hud.hidden = true;
  ui.sessionLabel.textContent = "";
  controls.controlnet.follow(null);
  controls.imagePrompt.follow(null);
  if (!keepSource) closeSource();
  setButtons("idle");
}

async function stop() {
  state.run += 1;
  cancelRetry();
  await disconnect({ keepSource: false });
  hideNotice(ui.notice);
  setStatus("idle", "stopped");
}

function setButtons(mode) {
  ui.start.disabled = mode !== "idle";
  ui.startPattern.disabled = mode !== "idle";
  ui.stop.disabled = mode === "idle";
}

// -- failures ------------------------------------------------------------------------------

function failed(error, again) {
  const label = error instanceof HttpError && error.busy ? "server busy"
    : error instanceof HttpError && error.unauthorized ? "token needed" : "error";
  setStatus("error", label);
  state.cancelRetry = explainFailure(ui.notice, error, { again, cancel: () => stop() });
}

function cancelRetry() {
  state.cancelRetry?.();
  state.cancelRetry = null;
}

// -- output and HUD ------------------------------------------------------------------------

function watchOutput() {
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) {
    ui.output.addEventListener("playing", () => (ui.outputPlaceholder.hidden = true), { once: true });
    return;
  }
  const video = ui.output;
  const generation = (state.watching = (state.watching ?? 0) + 1);
  const onFrame = () => {
    if (state.watching !== generation) return; // a newer session counts its own frames
    state.outputFrames += 1;
    ui.outputPlaceholder.hidden = true;
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function startHud(pc, timings) {
  const sampler = new RtcStats(pc);
  let server = null;
  const refresh = async () => {
    if (state.pc !== pc) return;
    const s = await sampler.sample();
    if (state.pc !== pc) return; // the session ended while sampling
    const items = [
      ["input", fmt(s.inFps, 1, " fps")],
      ["output", fmt(s.outFps, 1, " fps")],
      ["round trip", fmt(s.rttMs, 0, " ms")],
      ["jitter buffer", fmt(s.jitterMs, 0, " ms")],
      ["dropped", dropped(s, server)],
    ];
    if (!timings.empty) {
      const { spans, total } = timings.mean();
      const extra = document.createElement("div");
      const legend = document.createElement("div");
      legend.className = "legend";
      legend.textContent = spans.map(([n, ms]) => `${stageLabel(n)} ${ms.toFixed(0)}`).join(" · ");
      extra.append(stackBar(spans), legend);
      items.push(["server", fmt(total, 0, " ms"), extra, "grow"]);
    } else if (server?.stats?.last_age_ms != null) {
      items.push(["server", fmt(server.stats.last_age_ms, 0, " ms")]);
    }
    const info = state.server;
    const model = info ? [info.model, info.backend, info.device].filter(Boolean).join(" · ") : "";
    if (timings.quality) items.push(["temporal", qualityText(timings.quality), null, "quality"]);
    const control = controlText(timings);
    if (control) items.push(["controlnet", control, null, "controlnet"]);
    items.push(["codec", [s.codecOut, s.codecIn].filter(Boolean).join(" → ") || "—"]);
    if (model) items.push(["model", model]);
    renderStats(ui.hud, items);
    ui.hud.querySelector(".stat.quality")?.setAttribute("title", QUALITY_TITLE);
    ui.hud.hidden = false;
  };
  const poll = async () => {
    if (state.pc !== pc || !state.sessionId) return;
    const id = state.sessionId;
    try {
      // The list, not /api/sessions/{id}: a session that ended is news here, not a failed request.
      const { sessions } = await getJSON("/api/sessions");
      server = sessions.find((s) => s.id === id) ?? null;
      if (!server && state.sessionId === id) lost("the server ended the session");
    } catch {
      /* the next poll tries again; the peer's state says whether the link is gone */
    }
  };
  state.timers.push(setInterval(() => refresh().catch(() => {}), 1000));
  state.timers.push(setInterval(poll, 2000));
  poll();
}

/** The ControlNet's stages (its control image, then the network) from the server's timings, or null. */
function controlText(timings) {
  if (timings.empty) return null;
  const spans = timings.mean().spans.filter(([name]) => CONTROL_STAGES.includes(name));
  return spans.length ? spans.map(([name, ms]) => `${name} ${ms.toFixed(1)} ms`).join(" · ") : null;
}

function dropped(s, server) {
  const parts = [];
  if (s.framesDropped != null) parts.push(`${s.framesDropped} here`);
  const sv = server?.stats;
  if (sv) parts.push(`${(sv.dropped_in ?? 0) + (sv.dropped_out ?? 0)} server`);
  return parts.join(" · ") || "—";
}

// -- wiring --------------------------------------------------------------------------------

ui.start.addEventListener("click", () => start("camera"));
ui.startPattern.addEventListener("click", () => start("pattern"));
ui.stop.addEventListener("click", () => stop());
window.addEventListener("pagehide", () => {
  if (state.sessionId) endSession(state.sessionId, { keepalive: true }); // the server frees the slot now
  state.pc?.close();
});

function loadServerInfo() {
  serverInfo()
    .then((info) => {
      state.server = info;
      controls.controlnet.configure(info);
      controls.lora.configure(info);
      controls.imagePrompt.configure(info);
    })
    .catch(() => {
      /* not ready yet: /offer says so when the user starts, and connecting asks again */
    });
}

loadServerInfo();
