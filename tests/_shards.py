"""Uids for tests of the Redis store's sharded layout."""

from __future__ import annotations

import secrets
from typing import Any

__all__ = ["rotated", "uid_in"]


def uid_in(layout: Any, shard: int) -> str:
    """A lapse-like uid (24 URL-safe characters) placed in ``shard`` of ``layout``."""
    while True:
        uid = secrets.token_urlsafe(18)
        if layout.shard_of(uid) is layout.shards[shard]:
            return uid


def rotated(uid: str) -> str:
    """A new uid as lapse makes one at rotation: the first two characters kept."""
    return uid[:2] + secrets.token_urlsafe(18)[2:]
