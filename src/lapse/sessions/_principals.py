"""Principals in the store protocol: the optional :class:`PrincipalIndex`,
:class:`TooManySessions` and the check every principal passes before a
store sees it. The contract is the "Principals" part of
:mod:`lapse.sessions.store`, which exports these names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lapse.sessions.store import SessionInfo

__all__ = [
    "MAX_PRINCIPAL_LENGTH",
    "PRINCIPAL_MEMBERS",
    "PrincipalIndex",
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


@runtime_checkable
class PrincipalIndex(Protocol):
    """Sessions by principal (see the module's "Principals"): offered by
    every lapse store; a store without it cannot serve
    ``set_principal``, ``sessions_of`` or ``expire_principal`` (each then
    raises ``TypeError`` naming the store)."""

    async def set_principal(
        self, uid: str, principal: str | None, limit: int | None = None, refuse: bool = False
    ) -> list[str] | None:
        """Bind ``uid`` to ``principal`` (None: unbind), keeping at most
        ``limit`` live sessions bound to it; the uids superseded to make
        room, or None if ``uid`` is not live. :class:`TooManySessions` if
        ``refuse`` and it would take more than ``limit``."""

    async def sessions_of(self, principal: str) -> list[SessionInfo]:
        """The live sessions bound to ``principal``, most recently used first."""

    async def expire_principal(self, principal: str, except_uid: str | None = None) -> list[str]:
        """End every live session bound to ``principal`` but ``except_uid``."""


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
