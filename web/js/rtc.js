// Signalling helpers shared by the pages: auth token, /offer, WHEP, playout delay, codecs.

const TOKEN_KEY = "livediff.token";

/** The API token, kept in localStorage. A `?token=` in the page URL is stored, then taken out of the address bar. */
export const token = {
  get() {
    try {
      return localStorage.getItem(TOKEN_KEY) || memoryToken;
    } catch {
      return memoryToken;
    }
  },
  set(value) {
    memoryToken = value || "";
    try {
      if (value) localStorage.setItem(TOKEN_KEY, value);
      else localStorage.removeItem(TOKEN_KEY);
    } catch {
      /* storage disabled: the token lives for this page only */
    }
  },
};
let memoryToken = "";

(function tokenFromUrl() {
  const url = new URL(location.href);
  const value = url.searchParams.get("token");
  if (!value) return;
  token.set(value);
  url.searchParams.delete("token");
  history.replaceState(history.state, "", url.pathname + url.search + url.hash);
})();

/** A failed HTTP call, with what the pages need to explain it. */
export class HttpError extends Error {
  constructor(status, message, { retryAfter = null, body = null } = {}) {
    super(message);
    this.name = "HttpError";
    this.status = status;
    this.retryAfter = retryAfter;
    this.body = body;
  }
  get busy() {
    return this.status === 503;
  }
  get unauthorized() {
    return this.status === 401 || this.status === 403;
  }
}

function headers(extra = {}) {
  const auth = token.get();
  return auth ? { ...extra, Authorization: `Bearer ${auth}` } : extra;
}

async function failure(response) {
  const text = await response.text().catch(() => "");
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    /* not JSON */
  }
  const retry = Number.parseFloat(response.headers.get("Retry-After") ?? "");
  const detail = body?.error || body?.message || text || response.statusText;
  return new HttpError(response.status, `${response.status}: ${detail}`, {
    retryAfter: Number.isFinite(retry) ? retry : null,
    body,
  });
}

/** fetch() with the token; throws HttpError on a non-2xx answer. */
export async function request(url, { method = "GET", body, type } = {}) {
  const init = { method, headers: headers(type ? { "Content-Type": type } : {}) };
  if (body !== undefined) init.body = body;
  const response = await fetch(url, init);
  if (!response.ok) throw await failure(response);
  return response;
}

export async function getJSON(url) {
  return (await request(url)).json();
}

export async function patchJSON(url, data) {
  return (await request(url, { method: "PATCH", body: JSON.stringify(data), type: "application/json" })).json();
}

/**
 * The RTCConfiguration for a peer connection to this server: its STUN/TURN servers
 * (GET /api/ice-servers, with fresh short-lived TURN credentials when the server has a TURN
 * secret). `?ice=relay` in the page URL sends everything through the TURN server
 * (iceTransportPolicy "relay"), as a network that blocks direct UDP would.
 */
export async function rtcConfiguration() {
  const { iceServers } = await getJSON("/api/ice-servers");
  const config = { iceServers };
  if (new URL(location.href).searchParams.get("ice") === "relay") config.iceTransportPolicy = "relay";
  return config;
}

/**
 * A new RTCPeerConnection with `rtcConfiguration()`. It records the STUN/TURN errors the browser
 * reports (`icecandidateerror`) in `pc.iceErrors`, for `iceFailure(pc)` to explain a failure with.
 */
export async function createPeer() {
  const config = await rtcConfiguration();
  const pc = new RTCPeerConnection(config);
  pc.relayOnly = config.iceTransportPolicy === "relay";
  pc.iceErrors = [];
  pc.addEventListener("icecandidateerror", (event) => {
    // 701: the server could not be reached; 401/403/437/441...: the TURN server refused (RFC 8656 6.3, 8489 14.8).
    if (event.url) pc.iceErrors.push({ url: event.url, code: event.errorCode, text: event.errorText });
  });
  return pc;
}

/** Why ICE could not work for `pc`, in a sentence (or "" when nothing is known). */
export function iceFailure(pc) {
  const refused = pc.iceErrors?.find((e) => e.code >= 400 && e.code < 700);
  const unreachable = pc.iceErrors?.find((e) => e.code === 701);
  if (refused) return `the TURN server ${refused.url} refused this page (${refused.code} ${refused.text})`;
  if (pc.relayOnly && unreachable) return `the TURN server ${unreachable.url} could not be reached`;
  if (pc.relayOnly) return "no relayed path to the server (relay only: check the server's TURN settings)";
  return "";
}

/** Resolves once ICE gathering is complete (the server takes no trickled candidates) or after `ms`. */
export function iceGathered(pc, ms = 2000) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      pc.removeEventListener("icegatheringstatechange", done);
      resolve();
    }, ms);
    pc.addEventListener("icegatheringstatechange", done);
  });
}

/**
 * Offer `pc` to `POST /offer` with optional stream params; returns the server's answer body, or
 * null when `pc` was closed while the server answered (its session is then ended at once).
 */
export async function offer(pc, params = undefined) {
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc);
  requireCandidates(pc);
  const { sdp, type } = pc.localDescription;
  const response = await request("/offer", {
    method: "POST",
    body: JSON.stringify(params ? { sdp, type, params } : { sdp, type }),
    type: "application/json",
  });
  const answer = await response.json();
  if (pc.signalingState === "closed") {
    await endSession(answer.session_id);
    return null;
  }
  await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
  return answer;
}

/**
 * A WHEP viewer session at `endpoint` for `pc` (recvonly); returns the resource URL for DELETE,
 * or null when `pc` was closed while the server answered (the viewer is then ended at once).
 */
export async function whep(pc, endpoint) {
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc);
  requireCandidates(pc);
  const response = await request(endpoint, { method: "POST", body: pc.localDescription.sdp, type: "application/sdp" });
  const sdp = await response.text();
  const location = response.headers.get("Location");
  const resource = location ? new URL(location, new URL(endpoint, window.location.href)).href : null;
  if (pc.signalingState === "closed") {
    await endResource(resource);
    return null;
  }
  await pc.setRemoteDescription({ type: "answer", sdp });
  return resource;
}

/** Throws when gathering found no candidate at all (relay only with a TURN server that refused or is
 * unreachable): the server could never be reached, so no session is asked for. */
function requireCandidates(pc) {
  if (!pc.relayOnly || /^a=candidate:/m.test(pc.localDescription.sdp)) return;
  throw new Error(`Cannot reach the server: ${iceFailure(pc)}.`);
}

/**
 * Ends a WHEP/WHIP resource; errors are ignored (the server may already have ended it). With
 * `keepalive` the request outlives the page (for `pagehide`).
 */
export async function endResource(url, { keepalive = false } = {}) {
  if (!url) return;
  try {
    await fetch(url, { method: "DELETE", headers: headers(), keepalive });
  } catch {
    /* best effort */
  }
}

/**
 * Ask the browser for its lowest playout delay on every receiver of `pc`. Returns the setting used:
 * "jitterBufferTarget=0" (the standard), "playoutDelayHint=0" (older Chromium), or "browser default".
 */
export function lowestPlayoutDelay(pc) {
  let used = "browser default";
  for (const receiver of pc.getReceivers()) {
    if (receiver.track?.kind !== "video") continue;
    if ("jitterBufferTarget" in receiver) {
      receiver.jitterBufferTarget = 0;
      used = "jitterBufferTarget=0";
    } else if ("playoutDelayHint" in receiver) {
      receiver.playoutDelayHint = 0;
      used = "playoutDelayHint=0";
    }
  }
  return used;
}

/** Codecs the browser can send, by name ("VP8", "H264", "VP9", "AV1"), in its own order. */
export function videoCodecs() {
  const caps = globalThis.RTCRtpSender?.getCapabilities?.("video")?.codecs ?? [];
  return [...new Set(caps.map((c) => c.mimeType.split("/")[1]).filter((n) => !/rtx|red|ulpfec|flexfec/i.test(n)))];
}

/**
 * Put codec `name` first on `transceiver` (where setCodecPreferences exists); with `only`, offer it
 * alone (plus its retransmission codec), so the server cannot pick another. Returns whether it applied.
 */
export function preferCodec(transceiver, name, { only = false } = {}) {
  if (!name || !transceiver.setCodecPreferences) return false;
  const caps = RTCRtpReceiver.getCapabilities("video")?.codecs ?? [];
  const wanted = caps.filter((c) => c.mimeType.toLowerCase() === `video/${name.toLowerCase()}`);
  if (!wanted.length) return false;
  const helpers = caps.filter((c) => /\/(rtx|red|ulpfec|flexfec)/i.test(c.mimeType));
  const rest = only ? helpers : caps.filter((c) => !wanted.includes(c));
  transceiver.setCodecPreferences([...wanted, ...rest]);
  return true;
}

/** Ends a publishing session on the server (the demo's Stop); a session already gone is fine. */
export async function endSession(sessionId, options = {}) {
  await endResource(`/whip/${encodeURIComponent(sessionId)}`, options);
}

/** What the server runs (GET /readyz `engine`): model, backend, device, dtype, size, features. */
export async function serverInfo() {
  const { engine } = await getJSON("/readyz");
  return engine;
}
