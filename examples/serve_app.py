"""An application for ``lapse serve``: a visit counter kept in the session.

It makes a ``Site`` named ``site`` and does not serve it itself, so the
``lapse`` command can (from the repository root):

    lapse serve examples.serve_app:site
    lapse serve examples.serve_app:site --store sqlite:////tmp/sessions.db

Then visit http://127.0.0.1:8080/ : each visit counts one more in this
session's data (which any store keeps, across restarts on SQLite and Redis);
/logout ends the session. ``python examples/serve_app.py`` serves it too.
"""

from lapse.web.resource import Resource
from lapse.web.server import Site


class Counter(Resource):
    """``/``: how many times this session has visited."""

    def render_GET(self, request):
        session = request.getSession()
        visits = session.data.get("visits", 0) + 1
        session.data["visits"] = visits
        request.setHeader("content-type", "text/plain; charset=utf-8")
        return f"visits: {visits}\n"


class Logout(Resource):
    """``/logout``: end the session (its callbacks run; the cookie is deleted)."""

    def render_GET(self, request):
        request.getSession().expire()
        request.setHeader("content-type", "text/plain; charset=utf-8")
        return "logged out\n"


root = Resource()
root.putChild("", Counter())
root.putChild("logout", Logout())
site = Site(root)

if __name__ == "__main__":
    from lapse.internet import reactor

    reactor.listenTCP(8080, site, interface="127.0.0.1")
    reactor.run()
