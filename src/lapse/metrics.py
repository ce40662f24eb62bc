"""Prometheus metrics of a site's sessions (the ``metrics`` extra).

::

    from lapse.metrics import MetricsResource
    root.putChild(b"metrics", MetricsResource(site))

or, with prometheus_client's own registry and server::

    from prometheus_client import REGISTRY
    from lapse.metrics import SessionCollector
    REGISTRY.register(SessionCollector(site))

Metrics (of this process; on a shared store, sum them over processes, except
``lapse_sessions_live``, which :class:`MetricsResource` reads from the store):

- ``lapse_sessions_live`` (gauge);
- ``lapse_sessions_created_total``;
- ``lapse_sessions_ended_total{cause}`` (timeout, expired, lifetime, evicted);
- ``lapse_session_callback_errors_total``: ``notifyOnExpire`` callbacks that raised;
- ``lapse_session_hook_failures_total``: durable ``on_expire`` deliveries that raised;
- ``lapse_store_call_seconds{operation}`` (histogram): calls to a shared store.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "lapse.metrics needs prometheus-client: `pip install prometheus-client` "
        "(or, from a lapse checkout, `pip install '.[metrics]'`)"
    ) from exc

from lapse.web._mounted import MountedResource
from lapse.web.resource import Resource

__all__ = ["MetricsResource", "SessionCollector", "metrics_app"]


class SessionCollector(Collector):
    """A prometheus_client collector of ``site``'s session stats (a ``Site``
    or a ``lapse.asgi.SessionMiddleware``)."""

    def __init__(self, site: Any) -> None:
        self.site = site
        self.live: int | None = None
        """Live sessions as last counted by the store (set by
        :class:`MetricsResource`); None: this process's ``len(site.sessions)``."""

    def collect(self) -> Iterator[Metric]:
        site = self.site
        stats = site.stats
        live = GaugeMetricFamily("lapse_sessions_live", "Sessions live now.")
        live.add_metric([], len(site.sessions) if self.live is None else self.live)
        yield live
        yield CounterMetricFamily(
            "lapse_sessions_created", "Sessions created.", value=stats.created
        )
        ended = CounterMetricFamily(
            "lapse_sessions_ended", "Sessions ended, by cause.", labels=["cause"]
        )
        for cause, count in stats.ended.items():
            ended.add_metric([cause], count)
        yield ended
        yield CounterMetricFamily(
            "lapse_session_callback_errors",
            "notifyOnExpire callbacks that raised.",
            value=stats.callback_errors,
        )
        yield CounterMetricFamily(
            "lapse_session_hook_failures",
            "Deliveries of the durable on_expire hook that raised.",
            value=stats.hook_failures,
        )
        calls = HistogramMetricFamily(
            "lapse_store_call_seconds",
            "Latency of session store calls, by operation.",
            labels=["operation"],
        )
        for operation, latency in sorted(stats.store_calls.items()):
            buckets = [
                ("+Inf" if bound == float("inf") else repr(bound), count)
                for bound, count in latency.cumulative()
            ]
            calls.add_metric([operation], buckets, latency.sum)
        yield calls


class MetricsResource(Resource):
    """Renders ``site``'s session metrics in Prometheus' text format. Mount it
    where only the scraper reaches it (it shows no session, only counts)."""

    isLeaf = True

    def __init__(self, site: Any) -> None:
        super().__init__()
        self.collector = SessionCollector(site)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    async def render_GET(self, request: Any) -> bytes:
        site = self.collector.site
        store = site.store
        if store.shared and hasattr(store, "count"):
            try:
                self.collector.live = int(await site.call_store(store.count()))
            except Exception:
                self.collector.live = None
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self.registry)


def metrics_app(middleware: Any) -> MountedResource:
    """The metrics of ``middleware``'s sessions (a ``lapse.asgi.SessionMiddleware``)
    as an ASGI app, for a Starlette or FastAPI app to mount where only the
    scraper reaches it::

        sessions = SessionMiddleware(app, store=...)
        app.mount("/_lapse/metrics", metrics_app(sessions))
        # serve `sessions` (the wrapped app), e.g. uvicorn module:sessions
    """
    return MountedResource(MetricsResource(middleware), middleware)
