"""Vendor telemetry off: a self-hosted server reports nothing to its dependencies' vendors unasked.

`turn_off()` runs once when `livediff` is imported, so before the CLI or a library user imports
ONNX Runtime, OpenVINO or the Hugging Face hub through livediff. What each dependency collects by default,
as found on ONNX Runtime 1.32, huggingface_hub 2.4, OpenVINO 2026.4 with openvino-telemetry 2025.2:

* **ONNX Runtime** (1DS telemetry on Linux and macOS since 1.29): creating its environment, which
  `import onnxruntime` does, records a `ProcessInfo` event (a generated device id, the OS, the
  Python path, the network type) in `~/.cache/Microsoft/DeveloperTools/.onnxruntime/onnxruntime.db`
  to upload to `mobile.events.data.microsoft.com`; sessions, models and errors add events later.
  `ORT_DISABLE_TELEMETRY=1`, set before that import, is ONNX Runtime's full opt-out: no uploader,
  device id or database. `onnxruntime.disable_telemetry_events()` only silences what follows, so
  it is called as well when onnxruntime was imported before livediff (its `ProcessInfo` event is
  then already recorded: import livediff first).
* **Hugging Face hub client** (downloads of models not in the local cache): `HF_HUB_DISABLE_TELEMETRY=1`
  takes the library and torch versions out of the download requests' user agent (diffusers and
  transformers say `telemetry/off` instead) and stops `send_telemetry` pings. huggingface_hub reads
  it at import (`constants.HF_HUB_DISABLE_TELEMETRY`), diffusers copies it at import; both are set
  here too when already imported.
* **OpenVINO**: `import openvino` imports its model-conversion tools (`openvino.tools.ovc`), which
  set up `openvino-telemetry` and send a Google Analytics event (`ov/import`; a DNS look-up of
  www.google-analytics.com, a client id in `~/intel/openvino_ga_cid`, a usage count in
  `~/intel/stats`) unless the consent file `~/intel/openvino_telemetry` holds `0` (the vendor's
  `opt_in_out --opt_out`). Those tools fall back to a silent stub when `openvino_telemetry` cannot
  be imported, so it is marked unimportable here (`sys.modules["openvino_telemetry"] = None`),
  unless the consent file holds `1` (the operator opted in) or it was imported already. The
  runtime itself (`openvino.Core`, all livediff calls) sends nothing.
* **Ray** (the cluster layer, `livediff[cluster]`): usage stats are on by default;
  `RAY_USAGE_STATS_ENABLED=0` is set here, so a Ray started from livediff (`livediff serve
  --cluster`, the tests' local clusters) and every worker process it starts inherit it (the
  cluster test reads it in a replica's environment). A cluster started by `ray start` elsewhere
  decides at its own start: docs/scaling-out.md#no-phoning-home and the RayService manifest set the variable there.

Each variable is only set when absent: an operator who sets one (e.g. `ORT_DISABLE_TELEMETRY=0`)
gets the vendor's behaviour, which is asking.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SETTINGS = {
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""Environment variable -> the value that turns that vendor's telemetry off."""


def _off(variable: str) -> bool:
    """Whether the environment now has `variable` at its off value (the operator did not opt in)."""
    value = os.environ.get(variable, "").strip().lower()
    return value in ({"1", "true", "yes", "on"} if SETTINGS[variable] == "1" else {"0", "false", "no", "off"})


def openvino_consent_file() -> Path:
    """Where openvino-telemetry keeps its consent (`1` in, `0` out): ~/intel/openvino_telemetry on
    Linux and macOS, %LOCALAPPDATA%/Intel Corporation/openvino_telemetry on Windows."""
    if sys.platform == "win32":
        return Path(os.path.expandvars("$LOCALAPPDATA")) / "Intel Corporation" / "openvino_telemetry"
    return Path.home() / "intel" / "openvino_telemetry"


def _openvino_opted_in() -> bool:
    try:
        return openvino_consent_file().read_text().strip() == "1"
    except OSError:
        return False


def turn_off() -> dict[str, str]:
    """Set every vendor's opt-out the operator has not set, and apply it to the vendor libraries
    already imported. Idempotent. -> the settings now in force (variable -> value)."""
    for variable, value in SETTINGS.items():
        os.environ.setdefault(variable, value)
    ort = sys.modules.get("onnxruntime")
    if ort is not None and _off("ORT_DISABLE_TELEMETRY") and hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    if _off("HF_HUB_DISABLE_TELEMETRY"):
        for name in ("huggingface_hub.constants", "diffusers.utils.hub_utils"):
            module = sys.modules.get(name)
            if module is not None and hasattr(module, "HF_HUB_DISABLE_TELEMETRY"):
                module.__dict__["HF_HUB_DISABLE_TELEMETRY"] = True
    if "openvino_telemetry" not in sys.modules and not _openvino_opted_in():
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # imports raise ImportError
    return {variable: os.environ[variable] for variable in SETTINGS}
