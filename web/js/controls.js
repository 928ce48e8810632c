// The demo page's style controls: they hold the stream params and report each change once.
// Text applies on Enter, on blur and after a short pause in typing; sliders while dragging (throttled).

import { ControlNetPanel } from "./controlnet.js";
import { LoRAPanel } from "./lora.js";
import { ImagePromptPanel } from "./image_prompt.js";

const TYPING_DEBOUNCE_MS = 600;
const SLIDER_THROTTLE_MS = 150;
const MAX_SEED = 2 ** 31 - 1;
const FIELD_NAMES = { similarity_filter: "similarity filter", blend: "blend", negative_prompt: "negative prompt",
  controlnet: "ControlNet", loras: "LoRAs", image_prompt: "image prompt" };

function debounce(fn, ms) {
  let timer = null;
  const run = () => {
    clearTimeout(timer);
    timer = null;
    fn();
  };
  const wrapped = () => {
    clearTimeout(timer);
    timer = setTimeout(run, ms);
  };
  wrapped.now = run;
  return wrapped;
}

function throttle(fn, ms) {
  let last = 0;
  let timer = null;
  return () => {
    const wait = last + ms - performance.now();
    clearTimeout(timer);
    if (wait <= 0) {
      last = performance.now();
      fn();
    } else {
      timer = setTimeout(() => {
        last = performance.now();
        fn();
      }, wait);
    }
  };
}

export class Controls {
  /** `send(changes)` is called with only the fields that changed, e.g. {prompt: "..."}. */
  constructor(root, send) {
    this.send = send;
    const $ = (id) => root.querySelector(`#${id}`);
    this.el = {
      prompt: $("prompt"),
      promptState: $("prompt-state"),
      strength: $("strength"),
      strengthValue: $("strength-value"),
      steps: $("steps"),
      seed: $("seed"),
      newSeed: $("new-seed"),
      blendPrompt: $("blend-prompt"),
      blendWeight: $("blend-weight"),
      blendValue: $("blend-value"),
      similarity: $("similarity"),
      feedback: $("feedback"),
    };
    this.controlnet = new ControlNetPanel(root, () => this._commit("controlnet"));
    this.lora = new LoRAPanel(root, throttle(() => this._commit("loras"), SLIDER_THROTTLE_MS));
    this.imagePrompt = new ImagePromptPanel(root, (changes) => this.send(changes)); // its own messages: a frame is asked for anew each time
    this.sent = this.values();
    this._wire();
  }

  /** Every param as the server's JSON names them. */
  values() {
    const e = this.el;
    const checked = e.steps.querySelector('[aria-checked="true"]');
    return {
      prompt: e.prompt.value.trim(),
      strength: Number(e.strength.value),
      steps: Number(checked?.dataset.value ?? 1),
      seed: Math.min(MAX_SEED, Math.max(0, Math.floor(Number(e.seed.value) || 0))),
      blend: { prompt: e.blendPrompt.value.trim(), weight: Number(e.blendWeight.value) },
      similarity_filter: e.similarity.checked,
      controlnet: this.controlnet.value(),
      loras: this.lora.value(),
    };
  }

  /** Marks everything as sent (the offer carried it). */
  markSent() {
    this.sent = this.values();
  }

  _commit(...names) {
    const now = this.values();
    const changes = {};
    for (const name of names) {
      if (JSON.stringify(now[name]) !== JSON.stringify(this.sent[name])) changes[name] = now[name];
    }
    if (!Object.keys(changes).length) return;
    Object.assign(this.sent, changes);
    if ("prompt" in changes) this.promptState("pending", "Applying…");
    this.send(changes);
  }

  _wire() {
    const e = this.el;
    const prompt = debounce(() => this._commit("prompt"), TYPING_DEBOUNCE_MS);
    e.prompt.addEventListener("input", () => {
      this.promptState("", "Typing… applies after a pause, on Enter or when you leave the box");
      prompt();
    });
    e.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        prompt.now();
      }
    });
    e.prompt.addEventListener("blur", () => prompt.now());

    const strength = throttle(() => this._commit("strength"), SLIDER_THROTTLE_MS);
    e.strength.addEventListener("input", () => {
      e.strengthValue.textContent = Number(e.strength.value).toFixed(2);
      strength();
    });

    e.steps.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-value]");
      if (!button) return;
      for (const b of e.steps.querySelectorAll("button")) b.setAttribute("aria-checked", String(b === button));
      this._commit("steps");
    });

    e.seed.addEventListener("change", () => {
      e.seed.value = String(this.values().seed);
      this._commit("seed");
    });
    e.newSeed.addEventListener("click", () => {
      e.seed.value = String(Math.floor(Math.random() * MAX_SEED));
      this._commit("seed");
    });

    const blend = debounce(() => this._commit("blend"), TYPING_DEBOUNCE_MS);
    e.blendPrompt.addEventListener("input", blend);
    e.blendPrompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter") blend.now();
    });
    e.blendPrompt.addEventListener("blur", () => blend.now());
    const blendWeight = throttle(() => this._commit("blend"), SLIDER_THROTTLE_MS);
    e.blendWeight.addEventListener("input", () => {
      e.blendValue.textContent = Number(e.blendWeight.value).toFixed(2);
      blendWeight();
    });

    e.similarity.addEventListener("change", () => this._commit("similarity_filter"));
  }

  promptState(state, text) {
    this.el.promptState.dataset.state = state;
    this.el.promptState.textContent = text;
  }

  /** The server accepted a change. */
  acknowledged(ack, changes) {
    if (changes && "prompt" in changes) this.promptState("applied", "Applied");
    if (changes && "controlnet" in changes) this.controlnet.acknowledged(ack);
    if (changes && "loras" in changes) this.lora.acknowledged();
    if (changes && "image_prompt" in changes) this.imagePrompt.acknowledged(ack);
    const warning = ack.warnings?.[0];
    const names = Object.keys(changes ?? {}).map((name) => FIELD_NAMES[name] ?? name);
    this.feedback(warning ? "error" : "applied", warning ?? `Applied: ${names.join(", ")}`);
  }

  /** The server refused a change: say which field and why. */
  rejected(message, changes) {
    if (changes && "prompt" in changes) this.promptState("error", message.error);
    if (changes && "controlnet" in changes) this.controlnet.status(message.error, "error");
    if (changes && "loras" in changes) {
      const named = !message.field || message.error.includes(message.field);
      this.lora.status(named ? message.error : `${message.field}: ${message.error}`, "error");
    }
    if (changes && "image_prompt" in changes) this.imagePrompt.status(message.error, "error");
    this.feedback("error", message.field ? `${message.field}: ${message.error}` : message.error);
    // Resend it next time even if the value stays the same.
    for (const name of Object.keys(changes ?? {})) this.sent[name] = undefined;
  }

  feedback(state, text) {
    this.el.feedback.dataset.state = state;
    this.el.feedback.textContent = text;
  }
}
