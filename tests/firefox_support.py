"""Firefox for the page tests: Debian's Firefox ESR driven over Marionette (its built-in remote protocol).

Playwright drives only its own patched Firefox builds, which cannot be downloaded here, so the
Firefox tests talk to a stock Firefox through `marionette_driver`. Firefox runs headless with a
fresh profile: its fake camera, no permission prompts, host candidates as plain addresses (not
mDNS names) on the loopback test network, and no phoning home. Console messages of the pages go
to Firefox's stdout (`devtools.console.stdout.content`), where `Firefox.page_errors` finds the
uncaught ones, those thrown while a page loads included; `console.error` calls are collected in
the page itself (the browser's own components log errors to the same stdout).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from livediff.transport.loopback import free_port

FIREFOX_NAMES = ("firefox-esr", "firefox")

PREFS: dict[str, Any] = {
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,
    "media.peerconnection.ice.loopback": True,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "devtools.console.stdout.content": True,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
    "extensions.update.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "browser.newtabpage.enabled": False,
}

USER_ICE_PREFS: dict[str, Any] = {
    "media.peerconnection.ice.loopback": False,
    "media.peerconnection.ice.obfuscate_host_addresses": True,
}
"""Firefox's own defaults for ICE, as users have them: no loopback candidates, host addresses
hidden behind mDNS names (for pages without camera permission)."""


def firefox_binary() -> str | None:
    """Firefox ESR (or Firefox) on PATH, or the binary LIVEDIFF_FIREFOX names."""
    if "LIVEDIFF_FIREFOX" in os.environ:
        return shutil.which(os.environ["LIVEDIFF_FIREFOX"])
    return next((path for name in FIREFOX_NAMES if (path := shutil.which(name))), None)


def firefox_missing() -> str | None:
    """Why the Firefox tests cannot run here, or None."""
    if firefox_binary() is None:
        return "Firefox is not installed (apt-get install firefox-esr)"
    try:
        import marionette_driver  # noqa: F401
    except ImportError:
        return "marionette_driver is not installed (pip install marionette_driver)"
    return None


class Firefox:
    """One headless Firefox with one Marionette session; `js` runs in the page, `page(name)` reads its globals."""

    def __init__(
        self,
        width: int = 1360,
        height: int = 820,
        prefs: dict[str, Any] | None = None,
        accept_insecure_certs: bool = False,
    ) -> None:
        from marionette_driver.marionette import Marionette

        self.profile = Path(tempfile.mkdtemp(prefix="livediff-firefox-"))
        port = free_port()
        prefs = {**PREFS, **(prefs or {}), "marionette.port": port}
        (self.profile / "user.js").write_text(
            "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items())
        )
        self.log_path = self.profile / "stdout.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [str(firefox_binary()), "--headless", "--marionette", "--no-remote", "--profile", str(self.profile),
             f"--width={width}", f"--height={height}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            self.client = Marionette(host="127.0.0.1", port=port)
            self.client.raise_for_port(60)
            self.client.start_session({"acceptInsecureCerts": True} if accept_insecure_certs else None)
            self.client.set_window_rect(width=width, height=height)
        except BaseException:
            self.close()
            raise
        self.version = str(self.client.session_capabilities["browserVersion"])

    def goto(self, url: str) -> None:
        self.client.navigate(url)
        self.js("""const script = document.createElement("script");
          script.textContent = `window.__consoleErrors = [];
            const original = console.error.bind(console);
            console.error = (...args) => {
              window.__consoleErrors.push(args.map(String).join(" "));
              original(...args);
            };`;
          document.head.append(script);""")

    def js(self, body: str, *args: Any) -> Any:
        """Run `body` (a function body: `return ...`) with the page's own globals as `page`."""
        return self.client.execute_script("const page = window.wrappedJSObject;\n" + body, script_args=list(args))

    def click(self, selector: str) -> None:
        from marionette_driver.by import By

        self.client.find_element(By.CSS_SELECTOR, selector).click()

    def fill(self, selector: str, text: str) -> None:
        """Clear the field, then type `text` key by key."""
        from marionette_driver.by import By

        field = self.client.find_element(By.CSS_SELECTOR, selector)
        field.clear()
        field.send_keys(text)

    def text(self, selector: str) -> str:
        return str(self.js("return document.querySelector(arguments[0]).textContent", selector))

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.client.screenshot(full=False)))

    def page_errors(self) -> list[str]:
        """Uncaught exceptions of the pages so far, and console.error calls of the current page."""
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        uncaught = [
            line for line in lines if line.startswith(("JavaScript error: http://", "JavaScript error: https://"))
        ]
        return uncaught + [f"console.error: {m}" for m in self.js("return page.__consoleErrors ?? []")]

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None and client.session is not None:
            try:
                client.delete_session()
            except Exception:  # Firefox already gone: nothing left to end
                pass
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
