"""livediff.transport.sctp_text: the aiortc internals it wraps are where it expects them.

The behaviour (a text message that is not UTF-8 gets an error, the session lives on) is tested
through a real server in tests/test_server_control.py.
"""

from __future__ import annotations

from livediff.transport.sctp_text import check_aiortc_internals


def test_the_internals_are_where_the_module_expects_them() -> None:
    check_aiortc_internals()
