// Glass-to-glass bookkeeping for the latency page: send times by id, what was displayed, the
// server's per-frame stats, and the summary. No DOM here.

import { serverLegs } from "./hud.js";

/** The p-th percentile (0-100) of ascending `sorted`, linear between ranks; NaN when empty. */
export function percentile(sorted, p) {
  if (!sorted.length) return NaN;
  const rank = (p / 100) * (sorted.length - 1);
  const low = Math.floor(rank);
  const high = Math.ceil(rank);
  return sorted[low] + (sorted[high] - sorted[low]) * (rank - low);
}

/**
 * What became of a sent frame, as the downloads name it (`outcome`) and the summary labels it.
 * The server drops frames on purpose when the model (inbox) or the encoder (outbox) is slower than
 * the camera: each hop keeps only the newest frame. Its `stats` messages name those frames; any
 * other frame that never came back was lost on the way (the browser's encoder, the network, a
 * decoder), before the server or after it.
 */
export const OUTCOMES = {
  displayed: "shown",
  dropped_inbox: "dropped by the server: model busy",
  dropped_outbox: "dropped by the server: encoder busy",
  lost_before_server: "lost on the way to the server",
  lost_after_server: "lost on the way back",
  not_shown: "not shown (the server does not say what it dropped)",
};

export class LatencyRun {
  constructor({ label = "model", settings = {} } = {}) {
    this.label = label;
    this.settings = settings;
    this.sentAt = new Map(); // id -> performance.now() when painted and captured
    this.frames = new Map(); // id -> the first display of that id
    this.server = new Map(); // id -> the server's stats message
    this.droppedByServer = new Map(); // id -> "inbox" | "outbox": the server dropped it on purpose
    this.serverNamesDrops = false; // its stats messages carry `dropped` (servers before it did not)
    this.unreadable = 0; // displayed frames whose id could not be read
    this.repeats = 0; // displays of an id already seen (the server repeated a frame)
    this.stalePredictions = 0; // vsync predictions earlier than the frame's arrival
    this.started = null;
    this.ended = null;
    this.clock = null; // {offsetMs, roundTripMs}: the server's clock, measured by pings
  }

  start(now) {
    this.started = now;
  }

  end(now) {
    this.ended = now;
  }

  sent(id, now) {
    this.sentAt.set(id, now);
  }

  /**
   * A displayed frame: `id` null when unreadable; `meta` is requestVideoFrameCallback's metadata.
   *
   * The display time is the browser's vsync prediction (`expectedDisplayTime`). Chromium's first
   * prediction after an idle spell can be stale, even earlier than the frame's last packet
   * (`receiveTime`, seen at 100+ ms on a loaded host); such a frame is taken as shown when it was
   * handed to the compositor (`presentationTime`, or its arrival), and counted in
   * `stale_display_predictions`. (Headless Chromium puts `presentationTime` a fraction of a
   * millisecond after a good prediction, so only the arrival is evidence of a stale one.)
   */
  displayed(id, meta) {
    if (id == null) {
      this.unreadable += 1;
      return null;
    }
    const sent = this.sentAt.get(id);
    if (sent === undefined) return null; // from before this run
    if (this.frames.has(id)) {
      this.repeats += 1;
      return null;
    }
    let shown = meta.expectedDisplayTime;
    if (meta.receiveTime != null && shown < meta.receiveTime) {
      shown = Math.max(meta.receiveTime, meta.presentationTime ?? -Infinity);
      this.stalePredictions += 1;
    }
    const frame = {
      id,
      sent_ms: sent,
      displayed_ms: shown,
      received_ms: meta.receiveTime ?? null,
      g2g_ms: shown - sent,
      width: meta.width,
      height: meta.height,
    };
    this.frames.set(id, frame);
    return frame;
  }

  serverStats(message) {
    if (message.dropped) {
      this.serverNamesDrops = true;
      for (const slot of ["inbox", "outbox"]) {
        for (const id of message.dropped[slot] ?? []) if (this.sentAt.has(id)) this.droppedByServer.set(id, slot);
      }
    }
    if (message.frame_id != null && this.sentAt.has(message.frame_id)) this.server.set(message.frame_id, message);
  }

  /** What became of sent frame `id`: a key of OUTCOMES. */
  outcome(id) {
    if (this.frames.has(id)) return "displayed";
    const slot = this.droppedByServer.get(id);
    if (slot) return `dropped_${slot}`;
    if (!this.serverNamesDrops) return "not_shown";
    return this.server.has(id) ? "lost_after_server" : "lost_before_server";
  }

  /** The server's clock from `ControlChannel.syncClock` ({offsetMs, roundTripMs}), or null. */
  setClock(sync) {
    this.clock = sync;
  }

  /** Server clock minus this page's clock (ms); null when it could not be measured. */
  clockOffset() {
    return this.clock?.offsetMs ?? null;
  }

  /** A frame's glass-to-glass split into named spans (ms); null without the server's stats. */
  breakdown(frame, offset = this.clockOffset()) {
    const s = this.server.get(frame.id);
    if (!s || offset == null) return null;
    const spans = [["uplink+decode", s.received_ms - offset - frame.sent_ms]];
    spans.push(...serverLegs(s));
    spans.push(["encode+downlink+render", frame.displayed_ms - (s.sent_ms - offset)]);
    return spans;
  }

  /**
   * Every sent frame, oldest first, with its `outcome` (a key of OUTCOMES); a shown frame also has
   * its display times and its breakdown flattened into `<span>_ms` fields.
   */
  rows() {
    const offset = this.clockOffset();
    return [...this.sentAt.entries()]
      .sort((a, b) => a[1] - b[1])
      .map(([id, sent]) => {
        const frame = this.frames.get(id);
        if (!frame) return { id, outcome: this.outcome(id), sent_ms: sent };
        const row = { id, outcome: "displayed", ...frame };
        const s = this.server.get(frame.id);
        if (s) {
          row.server_batch_size = s.batch_size;
          row.server_skipped = s.skipped;
        }
        for (const [name, ms] of this.breakdown(frame, offset) ?? []) row[`${name.replace(/[^a-z0-9]+/gi, "_")}_ms`] = ms;
        return row;
      });
  }

  summary() {
    const g2g = [...this.frames.values()].map((f) => f.g2g_ms).sort((a, b) => a - b);
    const sent = this.sentAt.size;
    const received = this.frames.size;
    let reachedServer = 0;
    for (const id of this.sentAt.keys()) if (this.server.has(id)) reachedServer += 1;
    const mean = g2g.length ? g2g.reduce((a, b) => a + b, 0) / g2g.length : NaN;
    const means = new Map();
    let counted = 0;
    const offset = this.clockOffset();
    for (const frame of this.frames.values()) {
      const spans = this.breakdown(frame, offset);
      if (!spans) continue;
      counted += 1;
      for (const [name, ms] of spans) means.set(name, (means.get(name) ?? 0) + ms);
    }
    const outcomes = Object.fromEntries(Object.keys(OUTCOMES).map((key) => [key, 0]));
    for (const id of this.sentAt.keys()) outcomes[this.outcome(id)] += 1;
    const named = this.serverNamesDrops;
    return {
      label: this.label,
      duration_s: this.started != null && this.ended != null ? (this.ended - this.started) / 1000 : null,
      sent,
      received,
      // Frames the server dropped on purpose (null: this server does not say which), and the rest
      // of the frames that never came back, lost on the way.
      dropped_by_server: named ? outcomes.dropped_inbox + outcomes.dropped_outbox : null,
      dropped_by_server_inbox: named ? outcomes.dropped_inbox : null,
      dropped_by_server_outbox: named ? outcomes.dropped_outbox : null,
      lost_on_the_way: named ? outcomes.lost_before_server + outcomes.lost_after_server : sent - received,
      lost_before_server: named ? outcomes.lost_before_server : null,
      lost_after_server: named ? outcomes.lost_after_server : null,
      unreadable: this.unreadable,
      repeats: this.repeats,
      stale_display_predictions: this.stalePredictions,
      sent_by_server: reachedServer,
      read_back_ratio: sent ? received / sent : NaN,
      p50_ms: percentile(g2g, 50),
      p95_ms: percentile(g2g, 95),
      p99_ms: percentile(g2g, 99),
      max_ms: g2g.length ? g2g[g2g.length - 1] : NaN,
      min_ms: g2g.length ? g2g[0] : NaN,
      mean_ms: mean,
      clock_offset_ms: offset,
      clock_round_trip_ms: this.clock?.roundTripMs ?? null,
      breakdown_mean_ms: Object.fromEntries([...means].map(([name, sum]) => [name, sum / counted])),
    };
  }
}

/** Rows of objects as CSV, the union of their keys as the header. */
export function toCSV(rows) {
  const keys = [];
  for (const row of rows) for (const key of Object.keys(row)) if (!keys.includes(key)) keys.push(key);
  const cell = (value) => {
    if (value == null) return "";
    if (typeof value === "number") return Number.isFinite(value) ? String(Math.round(value * 1000) / 1000) : "";
    const text = String(value);
    return /[",\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
  };
  return [keys.join(","), ...rows.map((row) => keys.map((k) => cell(row[k])).join(","))].join("\n") + "\n";
}
