"""Components and adapters: state kept on a session through an interface."""

from __future__ import annotations

from typing import Any

import pytest
from zope.interface import Attribute, Interface, implementer

from lapse.internet.task import Clock
from lapse.python import components
from lapse.python.components import Componentized, registerAdapter
from lapse.web.resource import Resource
from lapse.web.server import Session, Site


class ICounter(Interface):
    value = Attribute("visits")


@implementer(ICounter)
class Counter:
    def __init__(self, session: Any) -> None:
        self.session = session
        self.value = 0


class CountingSession(Session):
    """A Session subclass, so the registration does not leak into other tests."""


registerAdapter(Counter, CountingSession, ICounter)


def test_adapter_is_made_once_per_session() -> None:
    """ICounter(session) makes a Counter on first use and returns it ever after."""
    site = Site(Resource(), reactor=Clock())
    site.sessionFactory = CountingSession
    session = site.makeSession()
    first = ICounter(session)
    first.value += 1
    assert ICounter(session) is first
    assert first.session is session
    other = site.makeSession()
    assert ICounter(other) is not first
    assert ICounter(other).value == 0


def test_duplicate_registration_refused() -> None:
    """Registering a second adapter for the same pair is a ValueError."""
    with pytest.raises(ValueError, match="registered"):
        registerAdapter(Counter, CountingSession, ICounter)


def test_duplicates_allowed_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ALLOW_DUPLICATES a registration replaces the earlier one."""

    class Local(Componentized):
        pass

    @implementer(ICounter)
    class Other(Counter):
        pass

    registerAdapter(Counter, Local, ICounter)
    monkeypatch.setattr(components, "ALLOW_DUPLICATES", True)
    registerAdapter(Other, Local, ICounter)
    assert isinstance(ICounter(Local()), Other)


def test_set_get_unset_component() -> None:
    """setComponent, getComponent and unsetComponent manage components by interface."""
    thing = Componentized()
    counter = Counter(None)
    thing.setComponent(ICounter, counter)
    assert thing.getComponent(ICounter) is counter
    assert ICounter(thing) is counter
    thing.unsetComponent(ICounter)
    assert thing.getComponent(ICounter, "none") == "none"


def test_no_adapter_is_type_error() -> None:
    """Adapting an object with no registered adapter raises TypeError."""

    class IOther(Interface):
        pass

    with pytest.raises(TypeError):
        IOther(Componentized())
