"""Choosing a keeper strategy by what the store declares."""

from __future__ import annotations

from typing import Any, cast

from lapse.sessions._keeper import ExpiryHook, Keeper, KeeperOwner
from lapse.sessions._local import LocalKeeper
from lapse.sessions._shared import SharedKeeper
from lapse.sessions.store import LocalSessionStore, SessionStore

__all__ = ["make_keeper"]


def make_keeper(
    owner: KeeperOwner,
    store: SessionStore,
    on_expire: ExpiryHook | None = None,
    **options: Any,
) -> Keeper:
    """The keeper of ``owner``'s sessions in ``store``: a
    :class:`~lapse.sessions.LocalKeeper` if the store ``holds_sessions`` (and
    is not ``shared``), else a :class:`~lapse.sessions.SharedKeeper`.

    ``options``: ``lease``, ``poll_interval``, ``max_attempts``,
    ``store_timeout``, ``rotation_grace``, ``max_sessions``,
    ``max_sessions_per_principal``, ``principal_policy`` (see
    :class:`~lapse.sessions.Keeper`).
    """
    if store.holds_sessions and not store.shared:
        return LocalKeeper(owner, cast(LocalSessionStore, store), on_expire, **options)
    return SharedKeeper(owner, store, on_expire, **options)
