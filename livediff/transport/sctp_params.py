"""An SCTP chunk parameter shorter than its own header is malformed, not a reason to loop forever.

Why
---
aiortc's `decode_params` (`aiortc/rtcsctptransport.py`) walks a chunk's parameters by each one's
Parameter Length, which counts the 4-byte type and length fields too, so it is at least 4
(RFC 9260, section 3.2.1). A length of 0 never advances the walk, and the loop appends forever:
one HEARTBEAT, ABORT, ERROR, RE-CONFIG or INIT chunk carrying such a parameter, sent by a
connected peer inside its DTLS session, stopped the server's event loop (every session with it)
and grew its memory without bound.

What
----
`reject_malformed_params()` replaces the module's `decode_params` with `decode_params_strictly`,
which raises `ValueError` for a Parameter Length under 4 or past the chunk. aiortc parses a
packet's chunks inside `RTCSctpTransport._handle_data`, which drops a packet whose parsing raises
`ValueError`: the malformed packet is ignored and the association goes on. Well-formed
parameters decode exactly as before. `check_aiortc_internals()` raises `AiortcInternalsError` if
`decode_params` or its callers moved.
"""

from __future__ import annotations

import inspect
from struct import unpack_from

from aiortc import rtcsctptransport

from livediff.transport.aiortc_guard import moved

PARAM_HEADER_BYTES = 4
"""Parameter Type and Parameter Length (RFC 9260, section 3.2.1), counted in the length."""
AIORTC_DECODE_PARAMS = rtcsctptransport.decode_params
"""aiortc's own function, as imported (the tests show what it does with a length of 0)."""


def decode_params_strictly(body: bytes) -> list[tuple[int, bytes]]:
    """A chunk's parameters as (type, value) pairs; `ValueError` when a length is under 4 or past `body`."""
    params = []
    pos = 0
    while pos <= len(body) - PARAM_HEADER_BYTES:
        param_type, param_length = unpack_from("!HH", body, pos)
        if param_length < PARAM_HEADER_BYTES or pos + param_length > len(body):
            raise ValueError(f"SCTP parameter {param_type} has an invalid length of {param_length} bytes")
        params.append((param_type, body[pos + PARAM_HEADER_BYTES : pos + param_length]))
        pos += param_length + rtcsctptransport.padl(param_length)
    return params


def check_aiortc_internals() -> None:
    """Raise `AiortcInternalsError` if aiortc no longer parses chunk parameters where this module expects."""
    callers = (rtcsctptransport.BaseParamsChunk.__init__, rtcsctptransport.InitChunk.__init__)
    if not callable(getattr(rtcsctptransport, "decode_params", None)) or not all(
        "decode_params(" in inspect.getsource(caller) for caller in callers
    ):
        raise moved(
            "sctp_params", "chunks no longer parse their parameters with decode_params", "aiortc/rtcsctptransport.py"
        )
    if "except ValueError" not in inspect.getsource(rtcsctptransport.RTCSctpTransport._handle_data):
        raise moved(
            "sctp_params",
            "RTCSctpTransport._handle_data no longer drops packets that fail to parse",
            "aiortc/rtcsctptransport.py",
        )


def reject_malformed_params() -> None:
    """Make aiortc's SCTP chunks parse their parameters with `decode_params_strictly` (idempotent)."""
    if rtcsctptransport.decode_params is decode_params_strictly:
        return
    check_aiortc_internals()
    rtcsctptransport.decode_params = decode_params_strictly  # type: ignore[assignment]
