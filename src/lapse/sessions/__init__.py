"""The session lifecycle: sessions and the expiry engine. Knows nothing of HTTP.

A session is born (``makeSession``), touched by each visit (its deadline
becomes ``lastModified + sessionTimeout``), and expires when the deadline
passes without a touch, or at once by ``expire()``. Expiring removes it from
its owner's ``sessions`` first, then runs each expiry callback once.
"""

from lapse.sessions._engine import ExpiryEngine
from lapse.sessions._session import Session, SessionOwner

__all__ = ["ExpiryEngine", "Session", "SessionOwner"]
