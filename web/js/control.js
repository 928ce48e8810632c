// The `control` data channel: params out (each with a request_id), acks/errors and stats in.

export class ControlChannel {
  /** `handlers`: {ack(message, sent), error(message, sent), stats(message), close()} */
  constructor(pc, handlers) {
    this.handlers = handlers;
    this.channel = pc.createDataChannel("control", { ordered: true });
    this.pending = new Map();
    this.queue = [];
    this.nextId = 1;
    this.channel.addEventListener("open", () => {
      for (const data of this.queue.splice(0)) this.channel.send(data);
    });
    this.channel.addEventListener("message", (event) => this._receive(event.data));
    this.channel.addEventListener("close", () => this.handlers.close?.());
  }

  get open() {
    return this.channel.readyState === "open";
  }

  /** Sends params changes; they are queued until the channel opens. */
  send(changes) {
    const requestId = this.nextId++;
    this.pending.set(requestId, changes);
    const data = JSON.stringify({ request_id: requestId, ...changes });
    if (this.open) this.channel.send(data);
    else this.queue.push(data);
    return requestId;
  }

  _receive(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return; // not ours to interpret
    }
    const sent = this.pending.get(message.request_id);
    if (message.request_id != null) this.pending.delete(message.request_id);
    if (message.type === "ack") this.handlers.ack?.(message, sent);
    else if (message.type === "error") this.handlers.error?.(message, sent);
    else if (message.type === "stats") this.handlers.stats?.(message);
    else this.handlers.other?.(message);
  }

  close() {
    this.handlers = {};
    this.channel.close();
  }
}
