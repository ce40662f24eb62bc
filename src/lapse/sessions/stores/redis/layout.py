"""Where a Redis deployment's session keys live: N shards, each under one key
base.

Every key a script touches for one session -- its hash, its shard's deadline,
ended and lease sets, claim hashes, delivery counter, announcement stream,
the aliases of its old uids -- starts with its shard's *base*, so on a Redis
Cluster all of them are in one hash slot and every operation stays one
script on one node.

- **One shard, untagged** (a single node or Sentinel, ``shards=1``, the
  default there): the base is the prefix itself, ``lapse``: the key names
  lapse has always used, so an existing deployment upgrades in place.
- **Tagged** (a cluster, or ``shards=N`` anywhere): shard *i*'s base is a hash
  tag, ``{lapse:i}`` (or ``{lapse:i:j}``, the first ``j`` that lands it in
  the *i*-th of N equal slices of the 16384 slots), so the shards spread
  evenly over the slot ranges a cluster gives its primaries.

A session's shard comes from the first two characters of its uid (12 bits,
in N equal ranges). lapse keeps those two characters when it rotates a
session's uid (the 132 other bits are new), so a rotation never leaves its
shard. Any other uid (not lapse's alphabet) is placed by CRC16.

The shard count is a property of the deployment: the first process stores
it at ``{prefix}:shards``; one started with another count refuses to run.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass

from lapse.sessions.stores.redis.slots import SLOTS, crc16

__all__ = ["MAX_SHARDS", "Layout", "Shard"]

MAX_SHARDS = 1024

_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
_INDEX = {char: i for i, char in enumerate(_ALPHABET)}
_SPAN = 64 * 64


@dataclass(frozen=True, slots=True)
class Shard:
    """The key names of one shard."""

    base: str
    deadlines: str
    ended: str
    leases: str
    seq: str
    events: str

    @classmethod
    def at(cls, base: str) -> Shard:
        return cls(
            base,
            f"{base}:deadlines",
            f"{base}:ended",
            f"{base}:leases",
            f"{base}:seq",
            f"{base}:events",
        )


@functools.lru_cache(maxsize=16)
def _tags(prefix: str, shards: int) -> tuple[str, ...]:
    """Shard i's hash tag: the first of ``prefix:i``, ``prefix:i:1``, ...
    whose slot is in the i-th of ``shards`` equal slices of the slots."""
    tags = []
    for i in range(shards):
        low, high = i * SLOTS // shards, (i + 1) * SLOTS // shards
        stem = f"{prefix}:{i}"
        tag, j = stem, 0
        while not low <= crc16(tag.encode()) % SLOTS < high:
            j += 1
            tag = f"{stem}:{j}"
        tags.append(tag)
    return tuple(tags)


class Layout:
    """The shards of one deployment (see the module)."""

    __slots__ = ("meta_key", "prefix", "shards", "tagged")

    def __init__(self, prefix: str, shards: int, *, tagged: bool) -> None:
        if not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"shards is a whole number from 1 to {MAX_SHARDS}, not {shards!r}")
        self.prefix = prefix
        self.tagged = tagged or shards > 1
        bases = [f"{{{tag}}}" for tag in _tags(prefix, shards)] if self.tagged else [prefix]
        self.shards = tuple(Shard.at(base) for base in bases)
        self.meta_key = f"{{{prefix}}}:shards"

    @property
    def count(self) -> int:
        return len(self.shards)

    def shard_of(self, uid: str) -> Shard:
        """The shard that holds ``uid``."""
        shards = self.shards
        if len(shards) == 1:
            return shards[0]
        index = _INDEX
        if len(uid) >= 2 and uid[0] in index and uid[1] in index:
            return shards[(index[uid[0]] * 64 + index[uid[1]]) * len(shards) // _SPAN]
        return shards[crc16(uid.encode()) % len(shards)]
