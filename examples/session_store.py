"""Twisted's "Web in 60 seconds: Storing Objects in the Session", on lapse.

Each visit to / counts one more visit in this session: the counter is a
component of the session, made once by the registered adapter and kept.
"""

from zope.interface import Attribute, Interface, implementer

from lapse.internet import reactor
from lapse.python.components import registerAdapter
from lapse.web.resource import Resource
from lapse.web.server import Session, Site


class ICounter(Interface):
    value = Attribute("An int value which counts up once per page view.")


@implementer(ICounter)
class Counter:
    def __init__(self, session):
        self.value = 0


registerAdapter(Counter, Session, ICounter)


class CounterResource(Resource):
    isLeaf = True

    def render_GET(self, request):
        session = request.getSession()
        counter = ICounter(session)
        counter.value += 1
        return "Visit #%d for you!" % (counter.value,)


factory = Site(CounterResource())

reactor.listenTCP(8080, factory)
reactor.run()
