"""The Redis store's Lua scripts, one ``.lua`` file each, read once at import.

``prelude.lua`` (the time, score formatting) and ``resolve.lua`` (following
a rotated uid's alias) are put in front of the scripts that need them by
``-- include:`` lines; comment lines are left out of what is sent (see
:mod:`lapse.sessions.stores._package_text`). The store runs each by its SHA1
(``EVALSHA``; ``EVAL`` once if the server lost it: :meth:`RedisClient.evalsha
<lapse.sessions.stores.redis.client.RedisClient.evalsha>`).
"""

from __future__ import annotations

from lapse.sessions.stores._package_text import read_source

__all__ = ["SOURCES"]

_NAMES = (
    "scan",
    "info",
    "count",
    "load",
    "create",
    "rotate",
    "save",
    "exists",
    "expire",
    "claim",
    "due",
    "renew",
    "ack",
    "next_deadline",
    "shards",
    "login",
    "members",
    "end_bound",
    "bind",
    "lock",
    "unlock",
    "reindex",
    "event_ids",
)

_PACKAGE = __name__.rpartition(".")[0]

SOURCES: dict[str, str] = {name: read_source(_PACKAGE, f"{name}.lua") for name in _NAMES}
"""Each operation's script, by name: what ``SCRIPT LOAD`` and ``EVAL`` send."""
