"""Adapters and componentized objects, on zope.interface.

``registerAdapter(Counter, Session, ICounter)`` says: to get an ``ICounter``
from a ``Session``, call ``Counter(session)``. A :class:`Componentized`
object (a session is one) keeps the adapter it made, so ``ICounter(session)``
returns the same object on every call for the session's lifetime: that is how
Twisted programs keep state "on" a session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zope.interface import declarations, implementedBy
from zope.interface.adapter import AdapterRegistry
from zope.interface.interface import InterfaceClass, adapter_hooks

__all__ = [
    "ALLOW_DUPLICATES",
    "Componentized",
    "getAdapterFactory",
    "registerAdapter",
]

ALLOW_DUPLICATES = False
"""Set to true to let ``registerAdapter`` replace an existing registration."""

globalRegistry = AdapterRegistry()


def _as_interface(spec: Any) -> Any:
    """A class becomes the interface specification of what it implements."""
    if isinstance(spec, InterfaceClass):
        return spec
    if isinstance(spec, type):
        return implementedBy(spec)
    raise TypeError(f"{spec!r} is neither an interface nor a class")


def registerAdapter(
    adapterFactory: Callable[[Any], Any], origInterface: Any, *interfaceClasses: Any
) -> None:
    """Register ``adapterFactory`` to adapt ``origInterface`` to each interface.

    ``origInterface`` may be an interface or a class. Registering a second
    adapter for the same pair is a ``ValueError`` unless
    :data:`ALLOW_DUPLICATES` is true.
    """
    if not interfaceClasses:
        raise TypeError("registerAdapter needs at least one interface to adapt to")
    required = _as_interface(origInterface)
    for interface in interfaceClasses:
        existing = globalRegistry.registered([required], interface)
        if existing is not None and not ALLOW_DUPLICATES:
            raise ValueError(f"an adapter from {origInterface!r} to {interface!r} is registered")
        globalRegistry.register([required], interface, "", adapterFactory)


def getAdapterFactory(fromInterface: Any, toInterface: Any, default: Any) -> Any:
    """The registered factory adapting ``fromInterface`` to ``toInterface``."""
    factory = globalRegistry.lookup1(_as_interface(fromInterface), toInterface)
    return default if factory is None else factory


def _adapt_hook(interface: Any, obj: Any) -> Any:
    factory = globalRegistry.lookup1(declarations.providedBy(obj), interface)
    if factory is None:
        return None
    return factory(obj)


adapter_hooks.append(_adapt_hook)


class Componentized:
    """An object that keeps one component (adapter) per interface.

    ``IFoo(obj)`` asks ``obj.getComponent(IFoo)``: a component set with
    :meth:`setComponent`, else one made once by the registered adapter and
    kept. The cache is created on first use, so objects that never use
    components cost nothing for it.

    The cache has a slot, and subclasses may add theirs (sessions do: a
    million of them are a million of these); ``__dict__`` stays, so any
    attribute can still be set on a componentized object, as in Twisted.
    """

    __slots__ = ("__dict__", "__weakref__", "_adapterCache")

    def __init__(self) -> None:
        self._adapterCache: dict[Any, Any] | None = None

    def _cache(self) -> dict[Any, Any]:
        cache = self._existing_cache()
        if cache is None:
            cache = self._adapterCache = {}
        return cache

    def _existing_cache(self) -> dict[Any, Any] | None:
        # A subclass whose __init__ does not call ours has no cache yet.
        return getattr(self, "_adapterCache", None)

    def setComponent(self, interfaceClass: Any, component: Any) -> None:
        """Use ``component`` as this object's ``interfaceClass``."""
        self._cache()[interfaceClass] = component

    def addComponent(self, component: Any, ignoreClass: bool = False) -> None:
        """Set ``component`` for every interface it provides."""
        for interface in declarations.providedBy(component):
            self.setComponent(interface, component)

    def unsetComponent(self, interfaceClass: Any) -> None:
        """Forget the component for ``interfaceClass``."""
        cache = self._existing_cache()
        if cache is not None:
            cache.pop(interfaceClass, None)

    def removeComponent(self, component: Any) -> list[Any]:
        """Forget ``component`` wherever it is set; the interfaces it was set for."""
        cache = self._existing_cache()
        if cache is None:
            return []
        removed = [k for k, v in cache.items() if v is component]
        for interface in removed:
            del cache[interface]
        return removed

    def getComponent(self, interface: Any, default: Any = None) -> Any:
        """The component for ``interface``: set, cached, or adapted now and kept."""
        cache: dict[Any, Any] | None = getattr(self, "_adapterCache", None)
        if cache is not None and interface in cache:
            return cache[interface]
        adapter = interface.__adapt__(self)
        if adapter is None:
            return default
        if not getattr(adapter, "temporaryAdapter", False):
            self._cache()[interface] = adapter
            if getattr(adapter, "multiComponent", False):
                self.addComponent(adapter)
        return adapter

    def __conform__(self, interface: Any) -> Any:
        return self.getComponent(interface)
