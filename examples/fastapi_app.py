"""A FastAPI app with lapse sessions: a visit counter kept in the session's
data, a logout, and a line printed when a session ends.

Run it with either of:

    uvicorn examples.fastapi_app:app
    python examples/fastapi_app.py [PORT]

(127.0.0.1:8000 by default). Sessions live in memory unless
LAPSE_SESSION_STORE names a store (sqlite:////tmp/sessions.db, redis://...).

    curl -c jar -b jar http://127.0.0.1:8000/          # {"visits":1}
    curl -c jar -b jar http://127.0.0.1:8000/          # {"visits":2}
    curl -c jar -b jar -X POST http://127.0.0.1:8000/logout
"""

import sys
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request

from lapse.asgi import SessionMiddleware, current_session, get_session
from lapse.sessions import Session

app = FastAPI()
app.add_middleware(SessionMiddleware, timeout=5 * 60)


def lapse_session(request: Request) -> Session:
    """The visitor's session, made on first use (the response sets its cookie)."""
    return get_session(request)


SessionDep = Annotated[Session, Depends(lapse_session)]


def expired(uid: str) -> None:
    # A uid is a credential: print only enough of it to tell sessions apart.
    print(f"Session {uid[:8]}... has expired.", flush=True)


@app.get("/")
def count(session: SessionDep) -> dict[str, Any]:
    visits = session.data.get("visits", 0) + 1
    session.data["visits"] = visits
    if visits == 1:
        uid = session.uid
        session.notifyOnExpire(lambda: expired(uid))
    return {"visits": visits}


@app.post("/logout")
def logout(request: Request) -> dict[str, bool]:
    session = current_session(request)  # None if the visitor has none: none is made
    if session is not None:
        session.expire()  # callbacks run; the response deletes the cookie
    return {"logged_out": session is not None}


if __name__ == "__main__":
    import uvicorn

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    uvicorn.run(app, host="127.0.0.1", port=port)
