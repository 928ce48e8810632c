"""What livediff's patches of aiortc internals share: the error they raise, the versions they were
tested with, and the warning outside those.

Six modules reach into aiortc's private API, each for a measured reason given in its own
docstring: `marker_jitterbuffer` (frame completion on the marker bit), `loss_recovery` (NACKs
repeated, holes given up, keyframes asked for), `encoded_sender` (one encode for every viewer),
`h264_profiles` (H.264 Main/High rows), `sctp_text` (text messages that are not UTF-8) and
`sctp_params` (chunk parameters whose length would loop forever). Each checks what it relies on
with a `check_aiortc_internals()` that raises `AiortcInternalsError` naming the installed aiortc
and what moved, and the test suite runs every one of those checks, so an aiortc upgrade that breaks
a patch fails loudly instead of silently. The version is read once per process (`aiortc_version`
is cached): the checks run per peer and per track event.
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings

TESTED_AIORTC_RANGE: tuple[tuple[int, int, int], tuple[int, int, int]] = ((1, 14, 0), (1, 17, 0))
"""aiortc versions the patches are tested with: [min, max). Outside it a warning is issued; the
structural checks decide."""


class AiortcInternalsError(RuntimeError):
    """aiortc's private API is not what a livediff patch relies on; the message says what moved."""


@functools.cache
def aiortc_version() -> str:
    """The installed aiortc's version, read once per process (importlib.metadata scans the
    installed distributions, ~0.7 ms a call: too dear for a check run on every track event)."""
    try:
        return importlib.metadata.version("aiortc")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def version_tuple(version: str) -> tuple[int, ...]:
    """`"1.16.0"` -> (1, 16, 0); non-digits in a part are ignored (`"1.17.0rc1"` -> (1, 17, 1))."""
    return tuple(int("".join(c for c in part if c.isdigit()) or "0") for part in version.split(".")[:3])


def warn_if_untested(patch: str) -> None:
    """Warn (once per call site) when the installed aiortc is outside TESTED_AIORTC_RANGE."""
    low, high = TESTED_AIORTC_RANGE
    if not low <= version_tuple(aiortc_version()) < high:
        warnings.warn(
            f"aiortc {aiortc_version()} is outside the range tested for {patch} {TESTED_AIORTC_RANGE}",
            RuntimeWarning,
            stacklevel=3,
        )


def moved(patch: str, what: str, sources: str) -> AiortcInternalsError:
    """The error for `patch` (a livediff module) when `what` no longer holds; `sources`: the aiortc
    files to re-read."""
    low, high = (".".join(map(str, v)) for v in TESTED_AIORTC_RANGE)
    return AiortcInternalsError(
        f"aiortc {aiortc_version()}: {what}. livediff.transport.{patch} relies on private "
        f"aiortc internals and was tested with aiortc >={low},<{high}; re-check {sources}."
    )
