// The demo page's ControlNet section: on/off, which ControlNet and control image, scale; the server's
// word on loading; a small view of the control image the session's frames are steered by.

import { request } from "./rtc.js";

const PREVIEW_EVERY_MS = 1000;
const IMAGE_LABELS = { canny: "Canny edges", depth: "Depth", previous: "Previous output" };

export class ControlNetPanel {
  /** `changed()` is called when the `controlnet` param the panel stands for changed. */
  constructor(root, changed) {
    const $ = (id) => root.querySelector(`#${id}`);
    this.el = {
      box: $("controlnet-box"),
      on: $("controlnet-on"),
      name: $("controlnet-name"),
      image: $("controlnet-image"),
      scale: $("controlnet-scale"),
      scaleValue: $("controlnet-scale-value"),
      state: $("controlnet-state"),
      preview: $("controlnet-preview"),
    };
    this.changed = changed;
    this.imageTouched = false;
    this.sessionId = null;
    this.timer = null;
    this.previewUrl = null;
    const e = this.el;
    e.on.addEventListener("change", () => {
      this.status(e.on.checked ? "Applying…" : "Off");
      this.changed();
      this._preview();
    });
    e.name.addEventListener("change", () => {
      if (!this.imageTouched) this._imageFor(e.name.value);
      if (e.on.checked) this.changed();
    });
    e.image.addEventListener("change", () => {
      this.imageTouched = true;
      if (e.on.checked) this.changed();
    });
    e.scale.addEventListener("input", () => {
      e.scaleValue.textContent = Number(e.scale.value).toFixed(2);
    });
    e.scale.addEventListener("change", () => e.on.checked && this.changed());
  }

  /** Shows the section when the server has ControlNets (`info.controlnets`, `info.preprocessors`). */
  configure(info) {
    const names = info?.controlnets ?? [];
    const images = info?.preprocessors ?? [];
    const e = this.el;
    e.box.hidden = names.length === 0;
    if (!names.length) return;
    const keep = (select, values, label) => {
      const before = select.value;
      select.replaceChildren(...values.map((v) => new Option(label(v), v)));
      if (values.includes(before)) select.value = before;
    };
    keep(e.name, names, (v) => v);
    keep(e.image, images, (v) => IMAGE_LABELS[v] ?? v);
    if (!this.imageTouched) this._imageFor(e.name.value);
  }

  /** A ControlNet named after a kind of control image (canny, depth) gets that image, until one is picked. */
  _imageFor(name) {
    const options = [...this.el.image.options].map((o) => o.value);
    if (options.includes(name)) this.el.image.value = name;
  }

  /** The `controlnet` param: [] when off. */
  value() {
    const e = this.el;
    if (e.box.hidden || !e.on.checked || !e.name.value) return [];
    return [{ name: e.name.value, preprocessor: e.image.value, scale: Number(e.scale.value) }];
  }

  /** The server's answer to a change: `controlnet_state` says which of the session's are still loading. */
  acknowledged(ack) {
    if (!this.el.on.checked) return;
    const loading = Object.entries(ack.controlnet_state ?? {}).filter(([, state]) => state === "loading");
    this.status(loading.length ? `Loading ${loading.map(([name]) => name).join(", ")}…` : "Applied", "applied");
  }

  /** A `{"type": "controlnet", name, state}` message: a ControlNet or the depth model loaded (or failed). */
  loaded(message) {
    const e = this.el;
    const awaited = e.name.value === message.name || (e.image.value === "depth" && message.name === "depth model");
    if (!e.on.checked || !awaited) return; // a late word on a ControlNet the panel no longer uses
    if (message.state === "ready") this.status(`${message.name} ready`, "applied");
    else this.status(`${message.name} failed: ${message.error}`, "error");
  }

  status(text, state = "") {
    this.el.state.textContent = text;
    this.el.state.dataset.state = state;
  }

  /** Follows session `id`'s control image while ControlNet is on (null: the session ended). */
  follow(id) {
    this.sessionId = id;
    this._preview();
  }

  _preview() {
    clearInterval(this.timer);
    this.timer = null;
    const e = this.el;
    const showing = this.sessionId && e.on.checked && !e.box.hidden;
    e.preview.hidden = !showing;
    if (!showing) return;
    const fetchOne = async () => {
      const id = this.sessionId;
      try {
        const response = await request(`/api/sessions/${encodeURIComponent(id)}/control.jpg`);
        if (response.status === 204 || id !== this.sessionId) return; // none yet (loading), or another session
        const blob = await response.blob();
        if (this.previewUrl) URL.revokeObjectURL(this.previewUrl);
        this.previewUrl = URL.createObjectURL(blob);
        e.preview.src = this.previewUrl;
      } catch {
        /* the session ended or the server is busy: the next poll asks again */
      }
    };
    fetchOne();
    this.timer = setInterval(fetchOne, PREVIEW_EVERY_MS);
  }
}
