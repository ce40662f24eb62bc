"""Redis Cluster hash slots, and the interface every Redis connection kind
offers the store.

:func:`key_slot` is the cluster's own rule: CRC16 (XMODEM) of the key, or of
its hash tag (the text between the first ``{`` and the next ``}``, if that is
not empty), modulo 16384. Keys with one tag are in one slot, so one script
may use them all on a cluster.

:class:`Commands` is what the store needs of a connection, whatever is
behind it: one node (:class:`~lapse.sessions.stores.redis.client.RedisClient`),
a cluster (routing each call by the slot of its first key) or the primary a
set of sentinels names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lapse.sessions.stores.redis.client import Arg, Script

__all__ = ["SLOTS", "Commands", "key_slot"]

SLOTS = 16384


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), as Redis Cluster uses."""
    crc = 0
    table = _TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc


def key_slot(key: str | bytes) -> int:
    """The cluster hash slot of ``key`` (0..16383), hash tags honoured."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16(raw) % SLOTS


class Commands(Protocol):
    """The calls the Redis store makes, on any kind of deployment."""

    async def execute(self, *args: Arg) -> Any:
        """A command with no key (``TIME``): any primary answers it."""

    async def execute_on(self, key: str, *args: Arg) -> Any:
        """A command whose keys are all in ``key``'s slot: sent to the node
        that owns that slot (on one node: just sent)."""

    async def evalsha(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """``script`` (EVALSHA, EVAL once on NOSCRIPT) on the node owning the
        slot of ``keys[0]`` (all its keys must share that slot)."""

    async def each_primary(self, *args: Arg) -> list[Any]:
        """A command sent to every primary (``SCRIPT LOAD``); their replies."""

    async def aclose(self) -> None:
        """Close every connection; the next call connects again."""
