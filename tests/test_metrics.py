"""Prometheus metrics of a site's sessions: the collector and the resource."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest
from conftest import call
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lapse.internet.task import Clock
from lapse.metrics import MetricsResource, SessionCollector
from lapse.sessions import Session
from lapse.web.resource import Resource
from lapse.web.server import Site


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def make_site(clock: Clock) -> Site:
    class Short(Session):
        sessionTimeout = 60

    root = Resource()
    site = Site(root, reactor=clock)
    site.sessionFactory = Short
    root.putChild(b"metrics", MetricsResource(site))
    return site


def test_exposition_counts(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="lapse")
    site = make_site(clock)
    for _ in range(3):
        site.makeSession()
    bad = site.makeSession()
    bad.notifyOnExpire(lambda: 1 / 0)
    bad.expire()
    clock.advance(30)
    site.makeSession()
    clock.advance(31)  # the first three time out
    response = call(site, "GET", "/metrics")
    assert response.status == 200
    assert response.header(b"content-type").startswith(b"text/plain")
    found = samples(response.body.decode())
    assert found[("lapse_sessions_live", ())] == 1
    assert found[("lapse_sessions_created_total", ())] == 5
    assert found[("lapse_sessions_ended_total", (("cause", "timeout"),))] == 3
    assert found[("lapse_sessions_ended_total", (("cause", "expired"),))] == 1
    assert found[("lapse_sessions_ended_total", (("cause", "evicted"),))] == 0
    assert found[("lapse_session_callback_errors_total", ())] == 1
    assert found[("lapse_session_hook_failures_total", ())] == 0
    # Scraping made no session.
    assert response.set_cookies == {}
    assert len(site.sessions) == 1


def test_store_latency_histogram(clock: Clock) -> None:
    site = make_site(clock)
    site.stats.store_call("load", 0.003)
    site.stats.store_call("load", 0.2)
    site.stats.store_call("create", 0.001)
    registry = CollectorRegistry()
    registry.register(SessionCollector(site))
    found = samples(generate_latest(registry).decode())
    load = (("operation", "load"),)
    assert found[("lapse_store_call_seconds_count", load)] == 2
    assert found[("lapse_store_call_seconds_sum", load)] == pytest.approx(0.203)
    assert found[("lapse_store_call_seconds_bucket", (("le", "0.005"), *load))] == 1
    assert found[("lapse_store_call_seconds_bucket", (("le", "+Inf"), *load))] == 2
    create = (("operation", "create"),)
    assert found[("lapse_store_call_seconds_bucket", (("le", "0.001"), *create))] == 1


def test_shared_store_live_count_comes_from_the_store(tmp_path: Any) -> None:
    import asyncio

    from conftest import call_async

    async def main() -> None:
        root = Resource()
        site = Site(root, store=f"sqlite:///{tmp_path / 'm.db'}")
        root.putChild(b"metrics", MetricsResource(site))
        for _ in range(2):
            await site._keeper.persist([site.makeSession()])
        site.sessions.clear()  # as if another process had made them
        response = await call_async(site, "GET", "/metrics")
        found = samples(response.body.decode())
        assert found[("lapse_sessions_live", ())] == 2
        store_calls = {k[1] for k in found if k[0] == "lapse_store_call_seconds_count"}
        assert (("operation", "count"),) in store_calls
        await site._keeper.aclose()

    asyncio.run(main())


def test_missing_prometheus_client_names_an_install_command_that_works() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "try:\n    import lapse.metrics\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "`pip install prometheus-client`" in out.stdout
    assert "`pip install '.[metrics]'`" in out.stdout
