"""Tests for anyone writing a session store: the contract lapse's own stores pass.

A store (see :class:`lapse.sessions.SessionStore`) is checked by subclassing
:class:`StoreContract` in a test module, giving a ``store`` fixture that makes
a fresh, empty store (not opened) on the fake clock it is given::

    import pytest
    from lapse.testing import FakeClock, StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self, store_clock: FakeClock) -> MyStore:
            return MyStore(clock=store_clock)

and running pytest (the ``test`` extra installs it): some 35 tests, each on a
fresh store and event loop, opened before and closed after. They state the
protocol's guarantees one by one: loads touch, saves write only changed keys,
ended sessions are claimed once per lease with their final data and cause,
``ack`` announces, rotations move data and alias the old uid for its grace,
an absolute lifetime holds however often a session is touched, ``renew``
extends only its own claim, inspection touches nothing, the index of
sessions by principal stays exact and its cap holds under concurrent
logins (skipped for a store without :class:`lapse.sessions.PrincipalIndex`). Time is the fake
clock, so nothing sleeps: the store must read its time from ``clock`` (a
callable returning seconds), as every lapse store does when given
``clock=``.

A store that needs a server (Redis) makes it in the fixture, as
``tests/test_store_contract.py`` of lapse does. Importing ``lapse`` does not
import this module (it imports pytest).
"""

from __future__ import annotations

import pytest

from lapse.testing._clock import FakeClock, scenario
from lapse.testing._inspection import InspectionContract, scan_all
from lapse.testing._lifecycle import LifecycleContract
from lapse.testing._principals import PrincipalContract

__all__ = ["FakeClock", "StoreContract", "scan_all", "scenario"]


class StoreContract(LifecycleContract, InspectionContract, PrincipalContract):
    """The whole store contract, for pytest to collect in a subclass named
    ``Test...`` that provides the ``store`` fixture (see the module)."""

    @pytest.fixture
    def store_clock(self) -> FakeClock:
        """The fake clock the store is made on (tests advance it)."""
        return FakeClock()

    @pytest.fixture
    def store(self, store_clock: FakeClock) -> object:
        """A fresh, empty, unopened store on ``store_clock``: override it."""
        raise NotImplementedError("a StoreContract subclass provides the store fixture")
