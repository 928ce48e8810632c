// The notice banner: what went wrong, in words, and the buttons that fix it.

import { HttpError, token } from "./rtc.js";

/**
 * Shows `el` with a title, a line of text, an optional input and action buttons.
 * `actions`: [{label, primary?, onClick(inputValue)}]; `input`: {type, placeholder, value, label}.
 * `name` lands in data-notice so tests and styles can tell notices apart.
 */
export function showNotice(el, { name, kind = "info", title, text = "", input = null, actions = [] }) {
  const body = document.createElement("div");
  body.className = "text";
  const strong = document.createElement("strong");
  strong.textContent = title;
  const line = document.createElement("span");
  line.className = "detail";
  line.textContent = text;
  body.append(strong, line);

  const buttons = document.createElement("div");
  buttons.className = "actions";
  let field = null;
  if (input) {
    field = document.createElement("input");
    field.type = input.type ?? "text";
    field.placeholder = input.placeholder ?? "";
    field.value = input.value ?? "";
    field.setAttribute("aria-label", input.label ?? input.placeholder ?? "value");
    field.autocomplete = "off";
    buttons.append(field);
  }
  for (const action of actions) {
    const button = document.createElement("button");
    button.textContent = action.label;
    if (action.primary) button.className = "primary";
    button.addEventListener("click", () => action.onClick(field?.value ?? null));
    buttons.append(button);
  }
  if (field && actions.length) {
    field.addEventListener("keydown", (event) => {
      if (event.key === "Enter") actions[0].onClick(field.value);
    });
  }
  el.dataset.kind = kind;
  el.dataset.notice = name ?? kind;
  el.replaceChildren(body, buttons);
  el.hidden = false;
  return { setText: (value) => (line.textContent = value), field };
}

export function hideNotice(el) {
  el.hidden = true;
  el.replaceChildren();
  delete el.dataset.notice;
}

/** Words for a getUserMedia failure, and whether a camera exists at all. */
export function cameraProblem(error) {
  switch (error?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return {
        title: "Camera access was denied",
        text: "Allow the camera in the browser's site settings and try again, or use the built-in test pattern.",
      };
    case "NotFoundError":
    case "OverconstrainedError":
      return { title: "No camera found", text: "Connect a camera and try again, or use the built-in test pattern." };
    case "NotReadableError":
    case "AbortError":
      return {
        title: "The camera is busy",
        text: "Another application may be using it. Close it and try again, or use the built-in test pattern.",
      };
    case "TypeError":
      return {
        title: "This page cannot use the camera",
        text: window.isSecureContext
          ? "This browser offers no camera to pages. Use the built-in test pattern instead."
          : `Browsers give the camera only to https:// pages (or http://localhost), and this one is ${location.origin}. ` +
            "Start the server with --tls self-signed (or your certificate: --tls-cert, --tls-key) and open its " +
            "https:// address, or use the built-in test pattern.",
      };
    default:
      return { title: "The camera could not start", text: `${error?.message ?? error}. Use the built-in test pattern instead.` };
  }
}

/**
 * Explains a failed signalling call: busy (503, counts down Retry-After then calls `again`),
 * auth (401/403, asks for the token and keeps it), anything else (the server's words).
 * Returns a function that cancels a pending retry.
 */
export function explainFailure(el, error, { again, cancel, retryAutomatically = true }) {
  let timer = null;
  const stopTimer = () => clearInterval(timer);
  if (error instanceof HttpError && error.busy) {
    const after = error.retryAfter ?? 5;
    let left = Math.max(1, Math.ceil(after));
    // 503 is both "every session slot is taken" and "the model is still loading": say the server's words.
    const reason = error.body?.error ? `The server says: ${error.body.error}.` : "The server cannot take a session now.";
    const describe = () =>
      `${reason} It asks to retry after ${after} s` + (retryAutomatically ? ` — trying again in ${left} s.` : ".");
    const notice = showNotice(el, {
      name: "busy",
      kind: "warn",
      title: "The server is busy",
      text: describe(),
      actions: [
        { label: "Retry now", primary: true, onClick: () => (stopTimer(), again()) },
        { label: "Cancel", onClick: () => (stopTimer(), hideNotice(el), cancel?.()) },
      ],
    });
    if (retryAutomatically) {
      timer = setInterval(() => {
        left -= 1;
        notice.setText(describe());
        if (left <= 0) {
          stopTimer();
          again();
        }
      }, 1000);
    }
  } else if (error instanceof HttpError && error.unauthorized) {
    const had = token.get();
    showNotice(el, {
      name: "auth",
      kind: "warn",
      title: had ? "The server refused this access token" : "This server needs an access token",
      text: "Enter the access token this server was started with. This browser keeps it for next time.",
      input: { type: "password", placeholder: "access token", label: "Access token" },
      actions: [
        {
          label: "Save and connect",
          primary: true,
          onClick: (value) => {
            token.set((value ?? "").trim());
            again();
          },
        },
      ],
    });
  } else if (error instanceof HttpError && error.status === 422) {
    const field = error.body?.field ? ` (${error.body.field})` : "";
    showNotice(el, {
      name: "invalid",
      kind: "error",
      title: `The server rejected a setting${field}`,
      text: `${error.body?.error ?? error.message}. Change it in the controls, then connect again.`,
      actions: [{ label: "Connect again", primary: true, onClick: again }],
    });
  } else {
    showNotice(el, {
      name: "error",
      kind: "error",
      title: "Could not connect to the server",
      text: String(error?.message ?? error),
      actions: [{ label: "Try again", primary: true, onClick: again }],
    });
  }
  return stopTimer;
}
