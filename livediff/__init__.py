"""livediff: real-time video-to-video diffusion over WebRTC.

Importing livediff turns its dependencies' vendor telemetry off (`livediff.telemetry`), before any
of them is imported through livediff: the CLI and library users alike.
"""

from livediff.telemetry import turn_off as _turn_off_vendor_telemetry

_turn_off_vendor_telemetry()
