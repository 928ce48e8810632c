// A moving test pattern drawn on a canvas and sent as a camera: colour blobs, a sweep and a clock,
// so the encoder and the model have real work to do. `beforeSend(ctx, w, h, now)` may paint over
// each frame (the latency page's probe strip) just before the frame is captured.

const BLOBS = [
  { hue: 265, r: 0.22, sx: 0.31, sy: 0.23, px: 0.0 },
  { hue: 190, r: 0.18, sx: 0.19, sy: 0.37, px: 1.7 },
  { hue: 330, r: 0.15, sx: 0.43, sy: 0.29, px: 3.1 },
  { hue: 40, r: 0.12, sx: 0.27, sy: 0.41, px: 4.4 },
];

export class PatternSource {
  constructor({ width = 640, height = 480, fps = 30, beforeSend = null } = {}) {
    this.width = width;
    this.height = height;
    this.fps = fps;
    this.beforeSend = beforeSend;
    this.canvas = document.createElement("canvas");
    this.canvas.width = width;
    this.canvas.height = height;
    this.ctx = this.canvas.getContext("2d", { alpha: false });
    this.frames = 0;
    this._timer = null;
  }

  /** Starts drawing; returns the MediaStream to send. */
  start() {
    // captureStream(0) + requestFrame(): exactly one captured frame per drawn frame, at our clock.
    this.stream = this.canvas.captureStream(0);
    this.track = this.stream.getVideoTracks()[0];
    if (typeof this.track.requestFrame !== "function") {
      this.stream = this.canvas.captureStream(this.fps);
      this.track = this.stream.getVideoTracks()[0];
    }
    const interval = 1000 / this.fps;
    const origin = performance.now();
    const tick = () => {
      const now = performance.now();
      this.draw(now);
      if (this.beforeSend) this.beforeSend(this.ctx, this.width, this.height, now);
      this.track.requestFrame?.();
      this.frames += 1;
      // Aim at the next slot of the fixed grid, so timer jitter does not accumulate.
      const next = origin + Math.ceil((performance.now() - origin + 1) / interval) * interval;
      this._timer = setTimeout(tick, Math.max(0, next - performance.now()));
    };
    tick();
    return this.stream;
  }

  stop() {
    clearTimeout(this._timer);
    this._timer = null;
    this.stream?.getTracks().forEach((t) => t.stop());
  }

  /** One frame of the scene at time `now` (ms). */
  draw(now) {
    const { ctx, width: w, height: h } = this;
    const t = now / 1000;
    const base = (t * 12) % 360;
    const bg = ctx.createLinearGradient(0, 0, w, h);
    bg.addColorStop(0, `hsl(${base}, 45%, 16%)`);
    bg.addColorStop(1, `hsl(${(base + 120) % 360}, 50%, 8%)`);
    ctx.fillStyle = bg;
    ctx.fillRect(0, 0, w, h);

    ctx.strokeStyle = "rgb(255 255 255 / 7%)";
    ctx.lineWidth = 1;
    const step = Math.max(16, Math.round(w / 16));
    const shift = (t * 20) % step;
    ctx.beginPath();
    for (let x = -step + shift; x < w; x += step) {
      ctx.moveTo(x, 0);
      ctx.lineTo(x, h);
    }
    for (let y = 0; y < h; y += step) {
      ctx.moveTo(0, y);
      ctx.lineTo(w, y);
    }
    ctx.stroke();

    const m = Math.min(w, h);
    for (const b of BLOBS) {
      const x = w * (0.5 + 0.38 * Math.sin(t * b.sx * 2 + b.px));
      const y = h * (0.55 + 0.3 * Math.cos(t * b.sy * 2 + b.px * 0.7));
      const g = ctx.createRadialGradient(x, y, 0, x, y, b.r * m);
      g.addColorStop(0, `hsl(${(b.hue + base) % 360}, 90%, 65%)`);
      g.addColorStop(1, `hsla(${(b.hue + base) % 360}, 90%, 50%, 0)`);
      ctx.fillStyle = g;
      ctx.beginPath();
      ctx.arc(x, y, b.r * m, 0, Math.PI * 2);
      ctx.fill();
    }

    const cx = w / 2;
    const cy = h * 0.56;
    const angle = t * 1.6;
    ctx.strokeStyle = "rgb(255 255 255 / 70%)";
    ctx.lineWidth = Math.max(2, m / 120);
    ctx.beginPath();
    ctx.arc(cx, cy, m * 0.22, angle, angle + Math.PI * 1.2);
    ctx.stroke();

    ctx.fillStyle = "#fff";
    ctx.font = `600 ${Math.round(m / 11)}px system-ui, sans-serif`;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText((now / 1000).toFixed(2), cx, cy);
    ctx.font = `${Math.round(m / 26)}px system-ui, sans-serif`;
    ctx.fillStyle = "rgb(255 255 255 / 65%)";
    ctx.fillText("livediff test pattern", cx, h * 0.8);
  }
}
