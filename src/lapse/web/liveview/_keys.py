"""The view's secret and what it signs: row ids, cursors, CSRF tokens.

Nothing here is per-process state: a row id or a cursor is the value it
names, encrypted and authenticated under keys derived from the view's
secret, so every process that shares the secret (the workers of ``lapse
serve --workers N``, given ``LAPSE_LIVEVIEW_SECRET``) reads back what any
of them gave out, and no process needs to remember anything.

The sealing is deterministic authenticated encryption in the SIV style,
built from HMAC-SHA256 alone::

    tag  = HMAC(k_tag, value)[:16]
    body = value XOR (HMAC(k_stream, tag || 0) || HMAC(k_stream, tag || 1) || ...)
    id   = urlsafe-base64(tag || body), without padding

Opening recomputes the keystream from the tag, then the tag from the value,
and compares them in constant time: an id that is altered, forged, or
sealed under another secret (or for another purpose: ids and cursors have
keys of their own) is refused, and reveals nothing of the value. The same
value always seals to the same text (a row keeps its id across pages and
processes); that equality is all the text tells.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re

from lapse import settings

__all__ = ["SECRET_ENV", "Keys", "Sealer", "sign"]

SECRET_ENV = "LAPSE_LIVEVIEW_SECRET"
"""The environment variable holding a secret the processes of one server share (hex)."""
TAG_BYTES = 16
_BLOCK = 32
"""Bytes of one HMAC-SHA256 (one block of keystream)."""
_URLSAFE = re.compile(rb"[A-Za-z0-9_-]+")


def _shared_secret() -> bytes | None:
    """The secret from ``LAPSE_LIVEVIEW_SECRET`` (hex, at least 32 bytes), or
    None if it is unset or empty. ValueError, not naming the value, if it is
    malformed (see :data:`lapse.settings.LIVEVIEW_SECRET`)."""
    return settings.LIVEVIEW_SECRET.get()


def sign(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 of ``message`` under ``key``."""
    return hmac.digest(key, message, "sha256")


def _derive(secret: bytes, purpose: str) -> bytes:
    return sign(secret, b"lapse-liveview key: " + purpose.encode("ascii"))


class Sealer:
    """Seals short texts into URL-safe strings only this secret opens (see
    the module); one per purpose."""

    def __init__(self, secret: bytes, purpose: str, prefix: str) -> None:
        # A letter first: a sealed text never starts with "-", so a command
        # line takes it as an argument, not as an option.
        self._prefix = prefix
        self._prefix_bytes = prefix.encode("ascii")
        self._tag_key = _derive(secret, purpose + " tag")
        self._stream_key = _derive(secret, purpose + " stream")

    def _xor_stream(self, tag: bytes, data: bytes) -> bytes:
        blocks = -(-len(data) // _BLOCK)
        stream = b"".join(sign(self._stream_key, tag + i.to_bytes(4, "big")) for i in range(blocks))
        mixed = int.from_bytes(data, "big") ^ int.from_bytes(stream[: len(data)], "big")
        return mixed.to_bytes(len(data), "big")

    def seal(self, value: str) -> str:
        """``value`` sealed: the same text for the same value, every time."""
        plain = value.encode("utf-8")
        tag = sign(self._tag_key, plain)[:TAG_BYTES]
        raw = tag + self._xor_stream(tag, plain)
        return self._prefix + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def open(self, sealed: bytes, max_length: int) -> str:
        """The value ``sealed`` holds; ValueError unless this sealer (this
        secret, this purpose) made exactly this text, at most ``max_length``
        characters long."""
        if (
            not 0 < len(sealed) <= max_length
            or not sealed.startswith(self._prefix_bytes)
            or not _URLSAFE.fullmatch(sealed)
        ):
            raise ValueError("not a sealed value")
        sealed = sealed[len(self._prefix_bytes) :]
        try:
            raw = base64.urlsafe_b64decode(sealed + b"=" * (-len(sealed) % 4))
        except (binascii.Error, ValueError):
            raise ValueError("not a sealed value") from None
        # One text per value: a second spelling (other padding bits) is refused.
        if len(raw) < TAG_BYTES or base64.urlsafe_b64encode(raw).rstrip(b"=") != sealed:
            raise ValueError("not a sealed value")
        tag = raw[:TAG_BYTES]
        plain = self._xor_stream(tag, raw[TAG_BYTES:])
        if not hmac.compare_digest(tag, sign(self._tag_key, plain)[:TAG_BYTES]):
            raise ValueError("not a sealed value")
        try:
            return plain.decode("utf-8")
        except UnicodeDecodeError:  # pragma: no cover - authentic, so sealed from a str
            raise ValueError("not a sealed value") from None


class Keys:
    """What the view's secret signs: row ids (``ids``), cursors
    (``cursors``) and the CSRF token of a nonce (:meth:`csrf_for`)."""

    def __init__(self, secret: bytes) -> None:
        self.ids = Sealer(secret, "row id", "r")
        self.cursors = Sealer(secret, "cursor", "c")
        self._csrf_key = _derive(secret, "csrf")

    def csrf_for(self, nonce: str) -> str:
        """The CSRF token (64 hex digits) the page of a CSRF cookie ``nonce`` carries."""
        return sign(self._csrf_key, nonce.encode("utf-8")).hex()
