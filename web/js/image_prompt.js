// The demo page's image-prompt section (IP-Adapter): use the camera's current frame or upload a picture
// as the session's reference image, a scale slider, off. Shown when the server has an IP-Adapter.

import { request } from "./rtc.js";

const SCALE_THROTTLE_MS = 150;

export class ImagePromptPanel {
  /** `send(changes)` sends live params over the control channel (acks come back through `acknowledged`). */
  constructor(root, send) {
    const $ = (id) => root.querySelector(`#${id}`);
    this.el = {
      box: $("image-prompt-box"),
      on: $("image-prompt-on"),
      frame: $("image-prompt-frame"),
      file: $("image-prompt-file"),
      scale: $("image-prompt-scale"),
      scaleValue: $("image-prompt-scale-value"),
      state: $("image-prompt-state"),
      preview: $("image-prompt-preview"),
    };
    this.send = send;
    this.sessionId = null;
    this.previewUrl = null;
    this.hasImage = false;
    const e = this.el;
    e.on.addEventListener("change", () => {
      if (e.on.checked) this.useFrame();
      else this._off();
    });
    e.frame.addEventListener("click", () => this.useFrame());
    e.file.addEventListener("change", () => e.file.files?.[0] && this.upload(e.file.files[0]));
    let timer = null;
    let last = 0;
    e.scale.addEventListener("input", () => {
      e.scaleValue.textContent = Number(e.scale.value).toFixed(2);
      if (!this.hasImage) return;
      clearTimeout(timer);
      const wait = last + SCALE_THROTTLE_MS - performance.now();
      timer = setTimeout(() => {
        last = performance.now();
        this.send({ image_prompt: { scale: this.scale() } });
      }, Math.max(0, wait));
    });
  }

  /** Shows the section when the server has an IP-Adapter (`info.ip_adapter`). */
  configure(info) {
    this.el.box.hidden = !info?.ip_adapter;
  }

  /** The session the section acts on (null: none; the section then turns off). */
  follow(id) {
    this.sessionId = id;
    const e = this.el;
    e.frame.disabled = e.file.disabled = !id;
    if (!id) {
      e.on.checked = false;
      this.hasImage = false;
      this.status("Off");
    }
  }

  scale() {
    return Number(this.el.scale.value);
  }

  /** Asks for the stream's current camera frame as the reference image (captured once, on the server). */
  useFrame() {
    if (!this.sessionId) return this.status("Start the camera first", "error");
    this.el.on.checked = true;
    this.hasImage = true;
    this.el.preview.hidden = true;
    this.status("Capturing this frame…", "pending");
    this.send({ image_prompt: { image: "frame", scale: this.scale() } });
  }

  /** Uploads `file` (JPEG, PNG or WebP) as the reference image. */
  async upload(file) {
    if (!this.sessionId) return this.status("Start the camera first", "error");
    const e = this.el;
    this.status(`Uploading ${file.name}…`, "pending");
    try {
      const url = `/api/sessions/${encodeURIComponent(this.sessionId)}/image-prompt?scale=${this.scale()}`;
      await request(url, { method: "PUT", body: file, type: file.type || "application/octet-stream" });
      e.on.checked = true;
      this.hasImage = true;
      if (this.previewUrl) URL.revokeObjectURL(this.previewUrl);
      this.previewUrl = URL.createObjectURL(file);
      e.preview.src = this.previewUrl;
      e.preview.hidden = false;
      this.status(`Using ${file.name}`, "applied");
    } catch (error) {
      const field = error.body?.field;
      this.status(field ? `${field}: ${error.body.error}` : String(error.message ?? error), "error");
    } finally {
      e.file.value = "";
    }
  }

  _off() {
    this.hasImage = false;
    this.el.preview.hidden = true;
    this.status("Off");
    this.send({ image_prompt: null });
  }

  /** The server applied an `image_prompt` change. */
  acknowledged(ack) {
    const prompt = ack.params?.image_prompt;
    if (!prompt) return this.status("Off");
    this.status(`${prompt.image === "frame" ? "This frame" : "Uploaded image"}, scale ${prompt.scale.toFixed(2)}`,
      "applied");
  }

  status(text, state = "") {
    this.el.state.textContent = text;
    this.el.state.dataset.state = state;
  }
}
