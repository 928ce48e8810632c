// The OBS viewer: plays a session's output over WHEP, full window, and reconnects by itself.
// /view/latest follows the newest session; /view/{id} that session. URL options:
// ?token=... (kept in localStorage), ?bg=transparent, ?fit=cover, ?quiet=1 (no status text).

import { HttpError, createPeer, endResource, getJSON, lowestPlayoutDelay, whep } from "./rtc.js";

const video = document.getElementById("video");
const status = document.getElementById("status");
const options = new URLSearchParams(location.search);
const target = sessionFromPath(location.pathname);
const latest = target === "latest";
const endpoint = latest ? "/whep" : `/whep/${encodeURIComponent(target)}`;

/** The session id in /view/{id}, "latest" for /view/latest (or a path that does not decode). */
function sessionFromPath(path) {
  const last = path.replace(/\/+$/, "").split("/").pop() || "latest";
  try {
    return decodeURIComponent(last);
  } catch {
    return "latest"; // a malformed escape: follow the newest session rather than show nothing
  }
}

const RETRY_MS = 2000;
const STALL_MS = 8000;

if (options.get("bg") === "transparent") document.documentElement.classList.add("transparent");
if (options.get("fit") === "cover") document.documentElement.classList.add("cover");
if (options.has("quiet")) document.documentElement.classList.add("quiet");

const viewer = { pc: null, resource: null, frames: 0, lastFrameAt: 0, connects: 0, playout: null, missing: 0 };
window.livediffViewer = viewer; // read-only, for the curious and the tests

function say(text, playing = false) {
  status.textContent = text;
  status.classList.toggle("playing", playing);
}

/** Ids of the live sessions (asked first, so waiting and tearing down make no failed requests). */
async function liveSessions() {
  const { sessions } = await getJSON("/api/sessions");
  return sessions.filter((s) => s.state !== "closed").map((s) => s.id);
}

async function sessionExists() {
  const live = await liveSessions();
  return latest ? live.length > 0 : live.includes(target);
}

async function connect() {
  if (!(await sessionExists())) {
    say(latest ? "waiting for a livediff session…" : `waiting for session ${target}…`);
    return false;
  }
  const pc = await createPeer();
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addEventListener("track", (event) => {
    video.srcObject = new MediaStream([event.track]);
  });
  viewer.pc = pc;
  viewer.lastFrameAt = performance.now();
  viewer.missing = 0;
  try {
    viewer.resource = await whep(pc, endpoint);
  } catch (error) {
    pc.close();
    viewer.pc = null;
    throw error;
  }
  viewer.playout = lowestPlayoutDelay(pc);
  viewer.connects += 1;
  say("connecting…");
  return true;
}

/** The id of the session a WHEP resource URL (/whep/{session}/{viewer}) plays, or undefined. */
function sessionOf(resource) {
  return resource?.match(/\/whep\/([^/]+)\//)?.[1];
}

async function disconnect() {
  const { pc, resource } = viewer;
  viewer.pc = null;
  viewer.resource = null;
  video.srcObject = null; // no last frame left on screen, and no late frame callback says "playing"
  pc?.close();
  // A viewer of a session that ended is gone with it; otherwise tell the server we left.
  const sessionId = sessionOf(resource);
  if (sessionId && (await liveSessions().catch(() => [])).includes(sessionId)) await endResource(resource);
}

/** Whether the current connection is over: failed, closed, no new frame for a while, or its
 * session missing from the server's live ones twice running (the publisher stopped: the peer
 * connection alone would take seconds to notice; twice, so that one incomplete list, e.g. from a
 * cluster replica that did not answer in time, ends nothing). A failed question keeps it playing. */
async function ended() {
  const pc = viewer.pc;
  if (!pc) return true;
  if (["failed", "closed"].includes(pc.connectionState)) return true;
  if (performance.now() - viewer.lastFrameAt > STALL_MS) return true;
  const sessionId = sessionOf(viewer.resource);
  const live = await liveSessions().catch(() => null);
  if (live === null || sessionId === undefined) return false;
  viewer.missing = live.includes(sessionId) ? 0 : viewer.missing + 1;
  return viewer.missing >= 2;
}

async function loop() {
  for (;;) {
    let wait = RETRY_MS;
    try {
      if (viewer.pc && (await ended())) {
        say("the session ended — reconnecting…");
        await disconnect();
      }
      if (!viewer.pc) await connect();
    } catch (error) {
      if (error instanceof HttpError && error.unauthorized) {
        say("access token needed: open this page once with ?token=YOUR_TOKEN");
        wait = 5000;
      } else if (error instanceof HttpError && error.retryAfter) {
        say(`the server is busy — retrying in ${error.retryAfter} s`);
        wait = error.retryAfter * 1000;
      } else {
        say(`waiting for the server… (${error?.message ?? error})`);
      }
    }
    await new Promise((resolve) => setTimeout(resolve, wait));
  }
}

function onFrame() {
  if (viewer.pc) {
    viewer.frames += 1;
    viewer.lastFrameAt = performance.now();
    say("playing", true);
  }
  video.requestVideoFrameCallback(onFrame);
}
if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
  video.requestVideoFrameCallback(onFrame);
} else {
  video.addEventListener("timeupdate", () => {
    if (!viewer.pc) return;
    viewer.lastFrameAt = performance.now();
    say("playing", true);
  });
}
window.addEventListener("pagehide", () => {
  endResource(viewer.resource, { keepalive: true }); // the server frees the viewer slot now
  viewer.pc?.close();
});
loop();
