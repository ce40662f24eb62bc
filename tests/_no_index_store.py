"""A store written elsewhere that keeps no index of sessions by principal
(importable by a served app: nothing of pytest in it)."""

from __future__ import annotations

from _dict_store import DictStore


class NoIndexStore(DictStore):
    """``tests/_dict_store.py``'s store without the three methods of
    ``PrincipalIndex`` (absent, as ``callable`` sees it)."""

    set_principal = None  # type: ignore[assignment]
    sessions_of = None  # type: ignore[assignment]
    expire_principal = None  # type: ignore[assignment]
