"""Twisted's "Web in 60 seconds: Session Basics", on lapse.

Visit / to see your session's uid; visit /expire to end the session (log out).
The next visit to / starts a new session with a new uid.

The howto served ShowSession from an .rpy file; as a program with its own
root, the page is the root's "" child (the path "/") and /expire its sibling.
"""

from lapse.internet import reactor
from lapse.web.resource import Resource
from lapse.web.server import Site


class ShowSession(Resource):
    def render_GET(self, request):
        return "Your session id is: " + request.getSession().uid


class ExpireSession(Resource):
    def render_GET(self, request):
        request.getSession().expire()
        return "Your session has been expired."


root = Resource()
root.putChild("", ShowSession())
root.putChild("expire", ExpireSession())
factory = Site(root)

reactor.listenTCP(8080, factory)
reactor.run()
