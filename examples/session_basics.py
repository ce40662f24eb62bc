"""Twisted's "Web in 60 seconds: Session Basics", on lapse.

Visit / to see your session's uid; visit /expire to end the session (log out).
The next visit to / starts a new session with a new uid.
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


resource = ShowSession()
resource.putChild("expire", ExpireSession())
factory = Site(resource)

reactor.listenTCP(8080, factory)
reactor.run()
