"""Session uids come from os.urandom in batches (lapse.web._uids)."""

from __future__ import annotations

import base64
import os
import re
import sys
import threading
from collections.abc import Callable

import pytest

from lapse.internet.task import Clock
from lapse.web import _uids
from lapse.web.resource import Resource
from lapse.web.server import Site

UID = re.compile(r"[A-Za-z0-9_-]{24}")


def counting_urandom(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes os.urandom is asked for from now on (it still answers)."""
    asked: list[int] = []
    real: Callable[[int], bytes] = os.urandom

    def urandom(size: int) -> bytes:
        asked.append(size)
        return real(size)

    monkeypatch.setattr(_uids.os, "urandom", urandom)
    monkeypatch.setattr(_uids, "_waiting", [])
    return asked


def test_a_uid_is_24_url_safe_characters_of_18_random_bytes() -> None:
    """Every uid decodes to 18 bytes and uses only cookie-safe characters."""
    for _ in range(3 * _uids.UIDS_PER_READ):
        uid = _uids.new_uid()
        assert UID.fullmatch(uid), uid
        assert len(base64.urlsafe_b64decode(uid)) == _uids.UID_BYTES


def test_one_urandom_read_gives_a_batch_of_distinct_uids(monkeypatch: pytest.MonkeyPatch) -> None:
    """os.urandom is read once per UIDS_PER_READ uids, for all their bytes,
    and the uids of a batch (and of the next) are all different."""
    asked = counting_urandom(monkeypatch)
    uids = [_uids.new_uid() for _ in range(_uids.UIDS_PER_READ)]
    assert asked == [_uids.UID_BYTES * _uids.UIDS_PER_READ]
    uids.append(_uids.new_uid())
    assert len(asked) == 2
    assert len(set(uids)) == len(uids)


def test_the_batch_is_the_uids_of_its_bytes_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each uid is exactly the base64 of its own 18 bytes of the read (no
    byte shared between two uids, none dropped)."""
    block = bytes(range(256)) * 9  # 2,304 bytes: one batch
    monkeypatch.setattr(_uids.os, "urandom", lambda size: block[:size])
    monkeypatch.setattr(_uids, "_waiting", [])
    handed = [_uids.new_uid() for _ in range(_uids.UIDS_PER_READ)]
    size = _uids.UID_BYTES
    expected = [
        base64.urlsafe_b64encode(block[at : at + size]).decode("ascii")
        for at in range(0, size * _uids.UIDS_PER_READ, size)
    ]
    assert sorted(handed) == sorted(expected)


def test_threads_taking_uids_at_once_each_get_distinct_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight threads taking uids together, across many batch ends: none
    fails on an emptied batch, and no uid is handed out twice."""
    monkeypatch.setattr(_uids, "_waiting", [])
    taken: list[list[str]] = [[] for _ in range(8)]
    failures: list[BaseException] = []
    start = threading.Barrier(len(taken))

    def take(into: list[str]) -> None:
        try:
            start.wait()
            for _ in range(10 * _uids.UIDS_PER_READ):
                into.append(_uids.new_uid())
        except BaseException as exc:  # (reported below, not lost in the thread)
            failures.append(exc)

    threads = [threading.Thread(target=take, args=(into,)) for into in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    every = [uid for into in taken for uid in into]
    assert len(every) == 8 * 10 * _uids.UIDS_PER_READ
    assert len(set(every)) == len(every)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_hands_out_a_uid_its_parent_holds() -> None:
    """After a fork the child reads its own batch: the uids parent and
    child hand out next are not the same ones."""
    _uids.new_uid()  # the parent holds a batch now
    held = list(_uids._waiting)
    assert held
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            child = [_uids.new_uid() for _ in range(len(held))]
            os.write(write_end, " ".join(child).encode("ascii"))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_uids = pipe.read().decode("ascii").split()
    os.waitpid(pid, 0)
    assert len(child_uids) == len(held)
    assert not set(child_uids) & set(held)
    assert _uids._waiting == held  # the parent's batch is untouched


def test_a_site_makes_sessions_from_the_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Site on the default entropy source (os.urandom) reads it once for
    a batch of sessions, not once per session."""
    asked = counting_urandom(monkeypatch)
    site = Site(Resource(), reactor=Clock())
    uids = {site.makeSession().uid for _ in range(10)}
    assert len(uids) == 10
    assert asked == [_uids.UID_BYTES * _uids.UIDS_PER_READ]
    assert all(UID.fullmatch(uid) for uid in uids)
    assert sys.modules["lapse.web._host"].os.urandom is site._entropy
