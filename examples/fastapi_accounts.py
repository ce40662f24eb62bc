"""FastAPI with lapse sessions bound to the user behind them: log in, list
"your active sessions" (device, last seen), "log out everywhere" (or
everywhere else), at most 3 devices per user.

Run it with either of:

    uvicorn examples.fastapi_accounts:app
    python examples/fastapi_accounts.py [PORT]

(127.0.0.1:8000 by default; sessions in memory unless LAPSE_SESSION_STORE
names a shared store, so that several processes serve the same users).

    curl -c jar -b jar -H 'content-type: application/json' \\
         -d '{"user": "alice", "password": "wonderland"}' http://127.0.0.1:8000/login
    curl -b jar http://127.0.0.1:8000/sessions
    curl -b jar -c jar -X POST 'http://127.0.0.1:8000/logout-everywhere?keep_this=true'
"""

import sys
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from lapse.asgi import SessionMiddleware, current_session, get_session, session_middleware
from lapse.sessions import Session

USERS = {"alice": "wonderland", "bob": "builder"}  # a demo: check real passwords properly

app = FastAPI()
app.add_middleware(SessionMiddleware, timeout=30 * 60, max_sessions_per_principal=3)


class Credentials(BaseModel):
    user: str
    password: str


def signed_in(request: Request) -> Session:
    """The visitor's session if a user is signed in on it, else 401."""
    session = current_session(request)
    if session is None or session.principal is None:
        raise HTTPException(401, "sign in first")
    return session


SignedIn = Annotated[Session, Depends(signed_in)]


@app.post("/login")
async def login(credentials: Credentials, request: Request) -> dict[str, Any]:
    if USERS.get(credentials.user) != credentials.password:
        raise HTTPException(401, "wrong user or password")
    session = get_session(request)
    session.rotate()  # a new uid at every login: no session fixation
    session.data["device"] = request.headers.get("user-agent", "unknown")[:120]
    # The fourth device ends the one used least recently (max_sessions_per_principal).
    superseded = await session.set_principal(credentials.user)
    return {"user": credentials.user, "signed_out_elsewhere": len(superseded)}


@app.get("/sessions")
async def your_sessions(session: SignedIn, request: Request) -> list[dict[str, Any]]:
    """Your active sessions, most recently used first."""
    rows = await session_middleware(request).sessions_of(session.principal or "")
    return [
        {
            "device": row.data.get("device", "unknown"),
            "last_seen": row.last_access,
            "this_one": row.uid == session.uid,
            # A uid is a credential: never show one, not even to its owner.
        }
        for row in rows
    ]


@app.post("/logout-everywhere")
async def logout_everywhere(
    session: SignedIn, request: Request, keep_this: bool = False
) -> dict[str, int]:
    """End every session of the user (or all but this one): their pages'
    sockets and streams close too, in every process."""
    keep = session.uid if keep_this else None
    ended = await session_middleware(request).expire_principal(
        session.principal or "", except_uid=keep
    )
    return {"ended": len(ended)}


@app.post("/logout")
def logout(request: Request) -> dict[str, bool]:
    session = current_session(request)
    if session is not None:
        session.expire()
    return {"logged_out": session is not None}


if __name__ == "__main__":
    import uvicorn

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    uvicorn.run(app, host="127.0.0.1", port=port)
