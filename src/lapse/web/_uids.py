"""Session uids, read from the system's random source in batches.

A uid is 144 random bits from ``os.urandom`` as 24 URL-safe base64
characters (cookie-safe, no padding; well past OWASP's 64 bits). One
``os.urandom`` call per new session is a system call per created session
(a tenth of the seed's create path measured in process, by py-spy), so
:func:`new_uid` reads :data:`UIDS_PER_READ` uids' worth at once and hands
them out one by one: the same kernel random source, the same bits per uid,
one system call per :data:`UIDS_PER_READ` sessions. 18 bytes are exactly
24 base64 characters, so the batch's encoding is the uids' encodings end to
end.

A forked child starts with none held: it never hands out a uid its parent
also holds. The uids waiting in the batch are as secret as the live
sessions' uids in the same process's memory.
"""

from __future__ import annotations

import os
from binascii import b2a_base64

__all__ = ["UIDS_PER_READ", "UID_BYTES", "encode_uid", "new_uid"]

UID_BYTES = 18
"""Random bytes per uid: 144 bits, 24 base64 characters."""

UIDS_PER_READ = 128
"""Uids read from ``os.urandom`` at once (2,304 bytes)."""

_URL_SAFE = bytes.maketrans(b"+/", b"-_")
_UID_CHARS = UID_BYTES * 4 // 3

_waiting: list[str] = []
"""Uids read and not yet handed out, taken from the end."""


def encode_uid(random_bytes: bytes) -> str:
    """``random_bytes`` (a multiple of 3 long) as URL-safe base64, unpadded."""
    return b2a_base64(random_bytes, newline=False).translate(_URL_SAFE).decode("ascii")


def new_uid() -> str:
    """A fresh uid (module doc). Safe from any thread: taking one is a
    single ``list.pop``, and a thread that finds none left reads a batch."""
    while True:
        try:
            return _waiting.pop()
        except IndexError:
            text = encode_uid(os.urandom(UID_BYTES * UIDS_PER_READ))
            _waiting.extend(text[at : at + _UID_CHARS] for at in range(0, len(text), _UID_CHARS))


def _forget_batch() -> None:
    _waiting.clear()


os.register_at_fork(after_in_child=_forget_batch)
