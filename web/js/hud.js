// Numbers for the HUDs: WebRTC getStats() deltas and the server's per-frame `stats` messages.

/** Samples a peer connection's stats; each `sample()` reports rates since the previous one. */
export class RtcStats {
  constructor(pc) {
    this.pc = pc;
    this.prev = null;
  }

  async sample() {
    const report = await this.pc.getStats();
    const now = performance.now();
    let inbound = null;
    let outbound = null;
    let pair = null;
    let remoteInbound = null;
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") inbound = s;
      else if (s.type === "outbound-rtp" && s.kind === "video") outbound = s;
      else if (s.type === "remote-inbound-rtp" && s.kind === "video") remoteInbound = s;
      else if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s;
    });
    const prev = this.prev;
    const dt = prev ? (now - prev.now) / 1000 : 0;
    const rate = (cur, old) => (dt > 0 && cur != null && old != null ? (cur - old) / dt : null);

    let jitterMs = null;
    if (inbound?.jitterBufferEmittedCount) {
      const dDelay = inbound.jitterBufferDelay - (prev?.inbound?.jitterBufferDelay ?? 0);
      const dCount = inbound.jitterBufferEmittedCount - (prev?.inbound?.jitterBufferEmittedCount ?? 0);
      jitterMs = dCount > 0 ? (dDelay / dCount) * 1000 : null;
    }
    const rtt = pair?.currentRoundTripTime ?? remoteInbound?.roundTripTime;
    const codec = (rtp) => {
      const c = rtp?.codecId ? report.get(rtp.codecId) : null;
      return c ? c.mimeType.split("/")[1] : null;
    };
    const result = {
      inFps: outbound?.framesPerSecond ?? rate(outbound?.framesEncoded, prev?.outbound?.framesEncoded),
      outFps: inbound?.framesPerSecond ?? rate(inbound?.framesDecoded, prev?.inbound?.framesDecoded),
      rttMs: rtt != null ? rtt * 1000 : null,
      jitterMs,
      framesDropped: inbound?.framesDropped ?? null,
      framesDecoded: inbound?.framesDecoded ?? null,
      framesSent: outbound?.framesSent ?? null,
      packetsLost: inbound?.packetsLost ?? null,
      kbpsIn: rate(inbound?.bytesReceived, prev?.inbound?.bytesReceived),
      kbpsOut: rate(outbound?.bytesSent, prev?.outbound?.bytesSent),
      codecIn: codec(inbound),
      codecOut: codec(outbound),
      width: inbound?.frameWidth ?? null,
      height: inbound?.frameHeight ?? null,
    };
    if (result.kbpsIn != null) result.kbpsIn = (result.kbpsIn * 8) / 1000;
    if (result.kbpsOut != null) result.kbpsOut = (result.kbpsOut * 8) / 1000;
    this.prev = { now, inbound, outbound };
    return result;
  }
}

/** Stage keys of a server `stats` message that are waits before the engine step, not parts of it. */
const WAIT_STAGES = new Set(["chunk_wait"]);

/**
 * The server's part of a frame's latency as named spans (ms, server clock, not clamped: they add up
 * to `sent_ms - received_ms`): the wait for the engine step, each engine stage, then the way to the
 * encoder. A chunked (video) model's wait is two legs, "chunk fill" (this frame until its chunk's
 * last frame came) and "chunk wait" (the complete chunk until its step, the server's `chunk_wait`),
 * and its output frames are "paced out" at the camera's rhythm before they reach the encoder.
 */
export function serverLegs(message) {
  const wait = message.scheduled_ms - message.received_ms;
  const chunkWait = message.stages_ms?.chunk_wait;
  const spans = chunkWait == null ? [["wait", wait]] : [["chunk fill", wait - chunkWait], ["chunk wait", chunkWait]];
  let staged = 0;
  for (const [name, ms] of Object.entries(message.stages_ms ?? {})) {
    if (WAIT_STAGES.has(name)) continue;
    spans.push([name, ms]);
    staged += ms;
  }
  const engine = message.finished_ms - message.scheduled_ms;
  if (engine - staged > 0.05) spans.push(["engine other", engine - staged]);
  spans.push([chunkWait == null ? "to encoder" : "paced out", message.sent_ms - message.finished_ms]);
  return spans;
}

/** Splits a server `stats` message into named spans (ms, server clock, none below 0): `serverLegs`. */
export function serverSpans(message) {
  return serverLegs(message).map(([name, ms]) => [name, Math.max(0, ms)]);
}

/** Rolling mean of the server's spans over the last `size` stats messages; the latest quality figures. */
export class ServerTimings {
  constructor(size = 30) {
    this.size = size;
    this.recent = [];
    this.quality = null;
  }
  add(message) {
    this.recent.push({ spans: serverSpans(message), total: message.sent_ms - message.received_ms });
    if (this.recent.length > this.size) this.recent.shift();
    if (message.quality?.samples) this.quality = message.quality;
  }
  get empty() {
    return this.recent.length === 0;
  }
  /** [[name, mean ms], ...] in order, and the mean total. */
  mean() {
    const sums = new Map();
    for (const { spans } of this.recent) {
      for (const [name, ms] of spans) sums.set(name, (sums.get(name) ?? 0) + ms);
    }
    const n = this.recent.length || 1;
    const total = this.recent.reduce((s, r) => s + r.total, 0) / n;
    return { spans: [...sums].map(([name, sum]) => [name, sum / n]), total };
  }
}

/** A stable colour per span name, for bars and legends. */
export function spanColour(name) {
  const fixed = {
    uplink: "#5ad1e6",
    "uplink+decode": "#5ad1e6",
    wait: "#6b7386",
    "to encoder": "#b48cff",
    "chunk fill": "#8a93a8",
    "chunk wait": "#c9a227",
    "paced out": "#d58cff",
    downlink: "#3ecf8e",
    "encode+downlink+render": "#3ecf8e",
    network: "#5ad1e6",
  };
  if (fixed[name]) return fixed[name];
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return `hsl(${(hash % 7) * 40 + 10}, 75%, 62%)`;
}

const STAGE_LABELS = { encode: "vae enc", decode: "vae dec", preprocess: "pre", postprocess: "post" };

/** Short display names for the engine's stage keys (its "encode" is the VAE, not the video codec). */
export function stageLabel(name) {
  return STAGE_LABELS[name] ?? name;
}

/**
 * The server's live temporal quality (`quality` of its stats messages, sampled about once a second):
 * warp error and flicker in levels of 255 (lower is steadier), SSIM of output against input.
 */
export function qualityText(quality) {
  if (!quality) return "—";
  return `warp ${fmt(quality.warp_error, 1)} · flicker ${fmt(quality.flicker, 1)} · SSIM ${fmt(quality.ssim, 2)}`;
}

export const QUALITY_TITLE =
  "Sampled on the server about once a second, at 128 px: warp error (output change along the input's motion) " +
  "and flicker (output change where the input stood still), in levels of 255, lower is steadier; SSIM of " +
  "the output against its input, 1 = the input's structure kept.";

export function fmt(value, digits = 0, unit = "") {
  if (value == null || !Number.isFinite(value)) return "—";
  return `${value.toFixed(digits)}${unit}`;
}

/**
 * Fills a <dl> with stat chips: each item is [label, value] or [label, value, extraNode, className];
 * a chip is <div class="stat"><dt>label</dt><dd>value</dd>extra</div>.
 */
export function renderStats(dl, items) {
  const chips = items.map(([label, value, extra = null, className = ""]) => {
    const chip = document.createElement("div");
    chip.className = `stat ${className}`.trim();
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = value;
    chip.append(dt, dd);
    if (extra) chip.append(extra);
    return chip;
  });
  dl.replaceChildren(...chips);
}

/** A thin stacked bar of [name, ms] spans (titles carry the numbers). */
export function stackBar(spans, className = "stages") {
  const bar = document.createElement("div");
  bar.className = className;
  const total = spans.reduce((s, [, ms]) => s + ms, 0) || 1;
  for (const [name, ms] of spans) {
    const part = document.createElement("span");
    part.style.flex = `${ms / total} 0 0`;
    part.style.background = spanColour(name);
    part.title = `${name} ${ms.toFixed(1)} ms`;
    bar.append(part);
  }
  return bar;
}
