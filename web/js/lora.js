// The demo page's LoRA section: one scale slider per LoRA the server loaded (`/readyz`'s `engine.loras`),
// sent as the session's `loras` param while a slider moves; the server's word on each change (it takes at
// most 4 at once, -2..2 each: a refusal names the field, e.g. `loras: takes at most 4`).

export class LoRAPanel {
  /** `changed()` is called when the `loras` param the panel stands for may have changed. */
  constructor(root, changed) {
    const $ = (id) => root.querySelector(`#${id}`);
    this.el = { box: $("lora-box"), list: $("lora-list"), reset: $("lora-reset"), state: $("lora-state") };
    this.changed = changed;
    this.names = [];
    this.el.reset.addEventListener("click", () => {
      for (const row of this._rows()) this._set(row, 0);
      this.changed();
    });
  }

  /** Shows a slider for each of the server's LoRAs (`info.loras`); a LoRA kept from before keeps its scale. */
  configure(info) {
    const names = info?.loras ?? [];
    this.el.box.hidden = names.length === 0;
    if (JSON.stringify(names) === JSON.stringify(this.names)) return;
    const before = new Map(this._rows().map((row) => [row.dataset.name, Number(row.querySelector("input").value)]));
    this.names = names;
    this.el.list.replaceChildren(...names.map((name) => this._row(name, before.get(name) ?? 0)));
    if ([...before.values()].some((scale) => scale !== 0)) this.changed(); // a LoRA the server no longer has
  }

  _row(name, scale) {
    const row = document.createElement("label");
    row.className = "field lora";
    row.dataset.name = name;
    const head = document.createElement("span");
    head.className = "head";
    const value = document.createElement("output");
    value.className = "value";
    head.append(name, " ", value);
    const slider = Object.assign(document.createElement("input"), {
      type: "range", min: "-2", max: "2", step: "0.05", title: `${name}: 0 leaves it out, negative pushes away from it`,
    }); // the server's range, [-2, 2]
    slider.setAttribute("aria-label", `${name} scale`);
    slider.addEventListener("input", () => {
      this._show(row);
      this.changed();
    });
    row.append(head, slider);
    this._set(row, scale);
    return row;
  }

  _rows() {
    return [...this.el.list.querySelectorAll(".lora")];
  }

  _set(row, scale) {
    row.querySelector("input").value = String(scale);
    this._show(row);
  }

  _show(row) {
    const scale = Number(row.querySelector("input").value);
    row.querySelector("output").textContent = scale === 0 ? "off" : scale.toFixed(2);
    row.dataset.on = String(scale !== 0);
  }

  /** The `loras` param: every LoRA whose scale is not 0, in the server's order. */
  value() {
    if (this.el.box.hidden) return [];
    return this._rows()
      .map((row) => ({ name: row.dataset.name, scale: Number(row.querySelector("input").value) }))
      .filter((lora) => lora.scale !== 0);
  }

  /** The server took the change. */
  acknowledged() {
    const on = this.value();
    const text = on.length ? `Applied: ${on.map((l) => `${l.name} ${l.scale.toFixed(2)}`).join(", ")}` : "Off";
    this.status(text, "applied");
  }

  /** Says `text` under the sliders; `state` "applied", "error" or "". */
  status(text, state = "") {
    this.el.state.textContent = text;
    this.el.state.dataset.state = state;
  }
}
