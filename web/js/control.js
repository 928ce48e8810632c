// The `control` data channel: params out (each with a request_id), acks/errors and stats in,
// and pings that match the server's clock to this page's.

export class ControlChannel {
  /** `handlers`: {ack(message, sent), error(message, sent), stats(message), close()} */
  constructor(pc, handlers) {
    this.handlers = handlers;
    this.channel = pc.createDataChannel("control", { ordered: true });
    this.pending = new Map();
    this.pongs = new Map(); // client_ms of a ping -> resolves with the server's answer
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

  /**
   * The server's clock minus this page's `performance.now()` (ms), NTP style: `count` pings, and of
   * the one with the shortest round trip, the server's time is taken at the round trip's midpoint
   * (off by at most half that round trip). Resolves {offsetMs, roundTripMs}, or null when the
   * server does not answer within `timeoutMs` (older servers).
   */
  async syncClock(count = 8, timeoutMs = 1000) {
    let best = null;
    for (let i = 0; i < count; i++) {
      if (!this.open) return null;
      const sent = performance.now();
      let answer;
      try {
        answer = await new Promise((resolve) => {
          const timer = setTimeout(() => resolve(null), timeoutMs);
          this.pongs.set(sent, (message) => {
            clearTimeout(timer);
            resolve(message);
          });
          this.channel.send(JSON.stringify({ type: "ping", client_ms: sent }));
        });
      } catch {
        return null; // the channel closed under us
      } finally {
        this.pongs.delete(sent);
      }
      if (!answer) return null;
      const back = performance.now();
      if (!best || back - sent < best.roundTripMs) {
        best = { offsetMs: answer.server_ms - (sent + back) / 2, roundTripMs: back - sent };
      }
    }
    return best;
  }

  _receive(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return; // not ours to interpret
    }
    if (message.type === "pong") {
      this.pongs.get(message.client_ms)?.(message);
      return;
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
