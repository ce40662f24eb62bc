"""A WebSocket chat bound to the session, on lapse.

Visit /, sign in with a name (the session is rotated and bound to the name
with ``set_principal``), and chat: every open page of this server sees every
message. /logout ends the session, and with it the page's socket: the page
shows "closed 1008 session ended". Signing out on one device ends only that
session; /logout-everywhere ends every session of the name
(``site.expire_principal``), closing the sockets of all the user's devices,
in every process of the deployment when the store is shared.

A socket's messages keep its session alive (a touch at most every tenth of
the timeout); a page left open with nobody typing does not: after
``sessionTimeout`` of silence the session ends and the socket closes.
"""

import html

from lapse.internet import reactor
from lapse.web.resource import Resource
from lapse.web.server import Session, Site
from lapse.web.websocket import WebSocketResource

PAGE = """<!doctype html>
<meta charset="utf-8"><title>chat</title>
<p>Signed in as <b id="me">{name}</b>.
<a href="/logout">Sign out</a> | <a href="/logout-everywhere">Sign out everywhere</a></p>
<p id="status">connecting</p>
<form id="say"><input id="text" autocomplete="off"><button>Send</button></form>
<ul id="log"></ul>
<script>
const status = document.getElementById("status");
const socket = new WebSocket(`ws://${{location.host}}/chat`);
socket.onopen = () => {{ status.textContent = "open"; }};
socket.onmessage = (event) => {{
  const item = document.createElement("li");
  item.textContent = event.data;
  document.getElementById("log").append(item);
}};
socket.onclose = (event) => {{
  status.textContent = `closed ${{event.code}} ${{event.reason}}`;
}};
document.getElementById("say").onsubmit = (event) => {{
  event.preventDefault();
  const text = document.getElementById("text");
  socket.send(text.value);
  text.value = "";
}};
</script>
"""

LOGIN = """<!doctype html>
<meta charset="utf-8"><title>chat</title>
<form action="/login"><input name="name" placeholder="your name"><button>Sign in</button></form>
"""


class ChatSession(Session):
    sessionTimeout = 900


class Home(Resource):
    isLeaf = True

    def render_GET(self, request):
        session = request.getSession()
        if session.principal is None:
            return LOGIN
        return PAGE.format(name=html.escape(session.principal))


class Login(Resource):
    isLeaf = True

    async def render_GET(self, request):
        name = request.args.get(b"name", [b""])[0].decode("utf-8", "replace").strip()[:40]
        if not name:
            request.setResponseCode(400)
            return "A name, please."
        session = request.getSession()
        session.rotate()  # a new uid at login, against session fixation
        await session.set_principal(name)
        request.redirect(b"/")
        return b""


class Logout(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.getSession().expire()  # its sockets close with 1008
        request.redirect(b"/")
        return b""


class LogoutEverywhere(Resource):
    isLeaf = True

    async def render_GET(self, request):
        session = request.getSession()
        if session.principal is not None:
            await factory.expire_principal(session.principal)
        request.redirect(b"/")
        return b""


class Chat(WebSocketResource):
    """Every message to every open socket of this process."""

    def __init__(self):
        super().__init__()
        self.sockets = set()

    async def websocket(self, request, socket):
        name = request.getSession().principal
        await socket.accept()
        if name is None:
            await socket.close(1008, "sign in first")  # (the page shows why)
            return
        self.sockets.add(socket)
        try:
            async for message in socket:
                if isinstance(message, str) and message.strip():
                    line = f"{name}: {message[:500]}"
                    for each in list(self.sockets):
                        await each.send(line)
        finally:
            self.sockets.discard(socket)


root = Resource()
root.putChild("", Home())
root.putChild("login", Login())
root.putChild("logout", Logout())
root.putChild("logout-everywhere", LogoutEverywhere())
root.putChild("chat", Chat())
factory = Site(root)
factory.sessionFactory = ChatSession

reactor.listenTCP(8080, factory)
reactor.run()
