"""Principals in the store protocol: :class:`TooManySessions` and the check
every principal passes before a store sees it. The contract (the
"Principals" part) and the optional ``PrincipalIndex`` protocol are in
:mod:`lapse.sessions.store`, which exports these names.
"""

from __future__ import annotations

__all__ = [
    "MAX_PRINCIPAL_LENGTH",
    "PRINCIPAL_MEMBERS",
    "TooManySessions",
    "check_principal",
]


class TooManySessions(Exception):
    """A login refused: ``principal`` already has ``limit`` live sessions
    and the policy (``max_sessions_per_principal`` with ``"refuse"``) is to
    refuse the new one rather than end the least recently used. Nothing was
    changed; the application answers as it sees fit (the session stays, not
    logged in)."""

    def __init__(self, principal: str, limit: int) -> None:
        super().__init__(f"{principal!r} already has {limit} live session(s), the most allowed")
        self.principal = principal
        self.limit = limit


PRINCIPAL_MEMBERS = ("set_principal", "sessions_of", "expire_principal")
"""The methods of :class:`PrincipalIndex`."""

MAX_PRINCIPAL_LENGTH = 256
"""The longest principal, in characters."""


def check_principal(principal: object) -> str:
    """``principal`` if a store can index it: a non-empty ``str`` of at most
    :data:`MAX_PRINCIPAL_LENGTH` characters, valid Unicode, with no control
    characters; else ``TypeError`` or ``ValueError`` saying why."""
    if not isinstance(principal, str):
        raise TypeError(f"a principal is a str, not {type(principal).__name__}")
    if not principal or len(principal) > MAX_PRINCIPAL_LENGTH:
        raise ValueError(
            f"a principal is 1 to {MAX_PRINCIPAL_LENGTH} characters, not {len(principal)}"
        )
    if any(ord(char) < 32 or 127 <= ord(char) < 160 for char in principal):
        raise ValueError(f"a principal has no control characters: {principal!r}")
    try:
        principal.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a principal is valid Unicode (it has a lone surrogate)") from None
    return principal
