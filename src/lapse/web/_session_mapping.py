"""A request's sessions under :class:`~lapse.asgi.SessionMiddleware`: its
visit (the session its cookie named, the one it uses, what to write and which
cookie to set) and ``scope["session"]``, the :class:`SessionMapping` over the
session's data that Starlette's ``request.session`` returns."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from lapse.sessions import Session, SessionData, StoreUnavailable, Visit
from lapse.web._plumbing import session_cookie, unwritten

if TYPE_CHECKING:
    from _collections_abc import dict_items, dict_keys, dict_values

    from lapse.asgi import SessionMiddleware

__all__ = ["MiddlewareVisit", "SessionMapping"]


class MiddlewareVisit(Visit):
    """One HTTP request's session: the one its cookie named, the one it uses."""

    __slots__ = ("current", "failed", "failure", "mapping", "owner", "presented", "secure", "used")

    def __init__(self, owner: SessionMiddleware, secure: bool) -> None:
        self.owner = owner
        self.secure = secure
        self.failure: StoreUnavailable | None = None
        """Why the session the cookie named could not be loaded: raised to
        the app when it asks for its session (then the answer is 503)."""
        self.failed = False
        """The app asked for its session and got ``failure``."""
        self.presented: Session | None = None
        """The live session the request's cookie named, if any."""
        self.current: Session | None = None
        """The session the request has: the presented one, or one it made."""
        self.used: list[Session] = []
        """Every session the request touched or made, for persisting."""
        self.mapping = SessionMapping(self)

    def _fail(self) -> None:
        if self.failure is not None:
            self.failed = True
            raise self.failure

    async def load_presented(self, uid: str) -> None:
        """Load (and touch) the session the request's cookie names, as the
        one it has; if the store cannot be reached, keep the failure, raised
        when the app asks for its session."""
        keeper = self.owner._keeper
        try:
            session = keeper.load_now(uid) if keeper.synchronous else await keeper.load(uid)
        except StoreUnavailable as exc:
            self.failure = exc
            return
        if session is not None:
            self.current = self.presented = session
            self.used.append(session)
            self.mapping._bind()

    def peek(self) -> Session | None:
        self._fail()
        session = self.current
        if session is None or session._expired:
            return None
        return session

    def get(self) -> Session:
        self._fail()
        session = self.current
        if session is None or session._expired:
            session = self.current = self.owner.makeSession()
            self.used.append(session)
            self.mapping._bind()
        return session

    def _note_end(self, session: Session) -> None:
        super()._note_end(session)
        if session is self.current:
            self.mapping._bind()

    def pending(self) -> list[Session]:
        """Sessions with changes not yet written (made or changed late)."""
        return unwritten(self, self.used)

    def cookie_headers(self) -> list[tuple[bytes, bytes]]:
        """The Set-Cookie headers the response needs: the session cookie if
        the request made a session or its uid changed (rotation), a deletion
        if the session ended; none otherwise."""
        session = self.current
        if session is None:
            return []
        secure = self.secure
        name = self.owner._cookie_names[1 if secure else 0]
        cookie = session_cookie(name, session, self.presented, self, secure)
        return [] if cookie is None else [(b"set-cookie", cookie)]


_MISSING: Any = object()


class SessionMapping(dict[str, Any]):
    """``scope["session"]``: the request's session data, made on first write.

    This is what Starlette's ``request.session`` returns: a ``dict`` (a
    subclass) in everything a program can see (``json.dumps``, ``==``, ``|``,
    ``|=``, ``copy()``, ``popitem()`` taking the newest key, ``repr``), whose
    changes go to the session's :attr:`~lapse.sessions.Session.data`, so only
    the changed keys are written. Reading without a session reads an empty
    dict (and makes none); writing makes the session, as ``get_session()``
    would. Values must be JSON-serialisable (see
    :class:`~lapse.sessions.SessionData`). ``clear()`` is a logout: it
    expires the session (callbacks run, the cookie is deleted).

    The dict's own storage is kept equal to the session's data (code such as
    ``json``'s C encoder reads it directly): filled when the request gets its
    session (every value decoded), then changed with the data.
    """

    __slots__ = ("_data", "_released", "_session", "_visit")

    def __init__(self, visit: MiddlewareVisit) -> None:
        super().__init__()
        self._visit = visit
        self._session: Session | None = None
        self._data: SessionData | None = None
        self._released = False

    # -- keeping the dict equal to the session's data -------------------------

    def _bind(self) -> Session | None:
        """The request's live session; the dict made equal to its data first
        if the session or its data object changed (made, ended, reloaded)."""
        session = self._visit.peek()
        data = None if session is None else session.data
        if session is not self._session or data is not self._data or self._released:
            self._attach(session, data)
        return session

    def _attach(self, session: Session | None, data: SessionData | None) -> None:
        self._unmirror()
        dict.clear(self)
        self._session = session
        self._data = data
        if data is not None:
            dict.update(self, {key: data[key] for key in data})
            if not self._released:
                if data._mirrors is None:
                    data._mirrors = []
                data._mirrors.append(self)

    def _unmirror(self) -> None:
        data = self._data
        if data is not None and data._mirrors:
            data._mirrors = [mirror for mirror in data._mirrors if mirror is not self]

    def _release(self) -> None:
        """The request is over: stop following the data's changes (a later
        use, from a task the request left behind, re-reads it each time)."""
        self._unmirror()
        self._released = True

    # -- reading --------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self._bind()
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        self._bind()
        return dict.get(self, key, default)

    def __contains__(self, key: object) -> bool:
        self._bind()
        return dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        self._bind()
        return dict.__iter__(self)

    def __reversed__(self) -> Iterator[str]:
        self._bind()
        return dict.__reversed__(self)

    def __len__(self) -> int:
        self._bind()
        return dict.__len__(self)

    def keys(self) -> dict_keys[str, Any]:
        self._bind()
        return dict.keys(self)

    def values(self) -> dict_values[str, Any]:
        self._bind()
        return dict.values(self)

    def items(self) -> dict_items[str, Any]:
        self._bind()
        return dict.items(self)

    def __eq__(self, other: object) -> bool:
        self._bind()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        self._bind()
        return dict.__ne__(self, other)

    def copy(self) -> dict[str, Any]:
        """A plain ``dict`` of the data (changing it changes no session)."""
        self._bind()
        return dict.copy(self)

    def __copy__(self) -> dict[str, Any]:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return copy.deepcopy(self.copy(), memo)

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (self.copy(),))

    def __or__(self, other: Any) -> Any:
        if not isinstance(other, dict):
            return NotImplemented
        merged = self.copy()
        merged.update(other)
        return merged

    def __ror__(self, other: Any) -> Any:
        if not isinstance(other, dict):
            return NotImplemented
        merged = dict(other)
        merged.update(self.copy())
        return merged

    def __repr__(self) -> str:
        self._bind()
        return dict.__repr__(self)

    @classmethod
    def fromkeys(cls, iterable: Iterable[Any], value: Any = None) -> Any:
        """A plain ``dict`` (a session mapping belongs to a request)."""
        return dict.fromkeys(iterable, value)

    # -- writing: through the session's data ----------------------------------

    def __setitem__(self, key: str, value: Any) -> None:
        session = self._visit.get()
        self._bind()
        session.data[key] = value

    def __delitem__(self, key: str) -> None:
        session = self._bind()
        if session is None or not dict.__contains__(self, key):
            raise KeyError(key)
        del session.data[key]

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        session = self._bind()
        if session is None or not dict.__contains__(self, key):
            if default is _MISSING:
                raise KeyError(key)
            return default
        value = dict.__getitem__(self, key)
        del session.data[key]
        return value

    def popitem(self) -> tuple[str, Any]:
        """Remove and return the newest key and its value, as a dict does."""
        session = self._bind()
        if session is None or not dict.__len__(self):
            raise KeyError("popitem(): dictionary is empty")
        key = next(dict.__reversed__(self))
        value = dict.__getitem__(self, key)
        del session.data[key]
        return key, value

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._bind()
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        self[key] = default
        return default

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """As ``dict.update``: a mapping (anything with ``keys()``), or pairs,
        then keyword arguments; each key written through the session."""
        if hasattr(other, "keys"):
            for key in other.keys():  # noqa: SIM118 - keys(), as dict.update calls it
                self[key] = other[key]
        else:
            for index, item in enumerate(other):
                try:
                    pair = tuple(item)
                except TypeError:
                    raise TypeError(
                        f"cannot convert dictionary update sequence element #{index} to a sequence"
                    ) from None
                if len(pair) != 2:
                    raise ValueError(
                        f"dictionary update sequence element #{index} has length "
                        f"{len(pair)}; 2 is required"
                    )
                self[pair[0]] = pair[1]
        for key, value in kwargs.items():
            self[key] = value

    def __ior__(self, other: Any) -> SessionMapping:  # type: ignore[override]
        self.update(other)
        return self

    def clear(self) -> None:
        """End the session (a logout), if the request has one."""
        session = self._bind()
        if session is not None:
            session.expire()
        self._attach(None, None)
