// Small canvas charts for the latency page: a time series, a histogram and stacked bars.

import { spanColour } from "./hud.js";

const AXIS = "#8b93a5";
const GRID = "rgb(255 255 255 / 6%)";
const FONT = "11px system-ui, sans-serif";

/** A 2D context sized to the canvas's CSS box at the device pixel ratio; returns [ctx, width, height]. */
function prepare(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = FONT;
  return [ctx, width, height];
}

/** A "nice" axis maximum at or above `value`. */
function niceMax(value) {
  if (!(value > 0)) return 10;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function yAxis(ctx, box, max, unit = "ms") {
  ctx.fillStyle = AXIS;
  ctx.strokeStyle = GRID;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    const y = box.bottom - ((box.bottom - box.top) * i) / 4;
    ctx.beginPath();
    ctx.moveTo(box.left, y);
    ctx.lineTo(box.right, y);
    ctx.stroke();
    ctx.fillText(String(Math.round(v)), box.left - 6, y);
  }
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  ctx.fillText(unit, 0, 0);
}

function emptyMessage(ctx, w, h, text) {
  ctx.fillStyle = AXIS;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText(text, w / 2, h / 2);
}

/**
 * Glass-to-glass per frame over the run: `points` [[seconds, ms]], `marks` [[label, ms, colour]]
 * drawn as horizontal lines (p50, p95).
 */
export function timeSeries(canvas, points, { duration = null, marks = [] } = {}) {
  const [ctx, w, h] = prepare(canvas);
  if (!points.length) return emptyMessage(ctx, w, h, "Glass-to-glass per frame appears here");
  const box = { left: 52, right: w - 12, top: 22, bottom: h - 24 };
  const maxMs = niceMax(Math.max(...points.map((p) => p[1]), ...marks.map((m) => m[1])) * 1.05);
  const maxT = duration ?? Math.max(1, points[points.length - 1][0]);
  yAxis(ctx, box, maxMs);
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  ctx.fillStyle = AXIS;
  for (let i = 0; i <= 5; i++) {
    const t = (maxT * i) / 5;
    ctx.fillText(`${t.toFixed(t < 10 && maxT < 10 ? 1 : 0)} s`, box.left + ((box.right - box.left) * i) / 5, box.bottom + 6);
  }
  const x = (t) => box.left + ((box.right - box.left) * t) / maxT;
  const y = (ms) => box.bottom - ((box.bottom - box.top) * Math.min(ms, maxMs)) / maxMs;
  for (const [label, ms, colour] of marks) {
    if (!Number.isFinite(ms)) continue;
    ctx.strokeStyle = colour;
    ctx.setLineDash([4, 4]);
    ctx.beginPath();
    ctx.moveTo(box.left, y(ms));
    ctx.lineTo(box.right, y(ms));
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = colour;
    ctx.textAlign = "right";
    ctx.textBaseline = "bottom";
    ctx.fillText(`${label} ${ms.toFixed(0)}`, box.right, y(ms) - 2);
  }
  ctx.strokeStyle = "rgb(138 125 255 / 55%)";
  ctx.beginPath();
  points.forEach(([t, ms], i) => (i ? ctx.lineTo(x(t), y(ms)) : ctx.moveTo(x(t), y(ms))));
  ctx.stroke();
  ctx.fillStyle = "#b3aaff";
  for (const [t, ms] of points) ctx.fillRect(x(t) - 1.5, y(ms) - 1.5, 3, 3);
}

/** A histogram of `values` (ms). */
export function histogram(canvas, values) {
  const [ctx, w, h] = prepare(canvas);
  if (!values.length) return emptyMessage(ctx, w, h, "Histogram appears here");
  const box = { left: 40, right: w - 12, top: 22, bottom: h - 24 };
  const sorted = [...values].sort((a, b) => a - b);
  const low = sorted[0];
  const high = sorted[sorted.length - 1];
  const bins = Math.min(30, Math.max(8, Math.round(Math.sqrt(values.length))));
  const span = Math.max(1, high - low);
  const counts = new Array(bins).fill(0);
  for (const v of values) counts[Math.min(bins - 1, Math.floor(((v - low) / span) * bins))] += 1;
  const maxCount = Math.max(...counts);
  yAxis(ctx, box, niceMax(maxCount), "frames");
  const barW = (box.right - box.left) / bins;
  const grad = ctx.createLinearGradient(0, box.top, 0, box.bottom);
  grad.addColorStop(0, "#8a7dff");
  grad.addColorStop(1, "#5ad1e6");
  ctx.fillStyle = grad;
  const yMax = niceMax(maxCount);
  counts.forEach((count, i) => {
    const barH = ((box.bottom - box.top) * count) / yMax;
    ctx.fillRect(box.left + i * barW + 1, box.bottom - barH, Math.max(1, barW - 2), barH);
  });
  ctx.fillStyle = AXIS;
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  ctx.fillText(`${low.toFixed(0)} ms`, box.left, box.bottom + 6);
  ctx.textAlign = "right";
  ctx.fillText(`${high.toFixed(0)} ms`, box.right, box.bottom + 6);
}

/** One stacked bar per frame (newest right): `frames` [[[name, ms], ...], ...]. */
export function stackedBars(canvas, frames) {
  const [ctx, w, h] = prepare(canvas);
  if (!frames.length) return emptyMessage(ctx, w, h, "Per-frame breakdown appears once the server's stats arrive");
  const box = { left: 52, right: w - 12, top: 22, bottom: h - 8 };
  const totals = frames.map((spans) => spans.reduce((s, [, ms]) => s + Math.max(0, ms), 0));
  const maxMs = niceMax(Math.max(...totals));
  yAxis(ctx, box, maxMs);
  const barW = (box.right - box.left) / frames.length;
  frames.forEach((spans, i) => {
    let y = box.bottom;
    for (const [name, ms] of spans) {
      const barH = ((box.bottom - box.top) * Math.max(0, ms)) / maxMs;
      ctx.fillStyle = spanColour(name);
      ctx.fillRect(box.left + i * barW + (barW > 4 ? 0.5 : 0), y - barH, Math.max(1, barW - (barW > 4 ? 1 : 0)), barH);
      y -= barH;
    }
  });
}
