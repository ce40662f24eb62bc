"""Short plain-text answers, as ASGI messages (no server imported: the web
layer's session answers are built from the same function)."""

from __future__ import annotations

from typing import Any

__all__ = ["text_response"]


def text_response(status: int, body: bytes, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    """The ``http.response.start`` message of a short plain-text answer of
    ``body``, with ``headers`` besides its type and length."""
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
            *headers,
        ],
    }
