"""Prometheus metrics of the broker (``zchannels broker --metrics-port PORT``).

A small HTTP server thread (prometheus_client's) answers GET /metrics.  The router
loop keeps plain int counters; the collector reads them at scrape time, so routing
never calls into prometheus_client.  Reading ints and ``len()`` of the registries from
another thread is safe under the GIL, and a scrape sees each value at one moment.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from zchannels.broker.busmonitor import BusMonitor
    from zchannels.broker.router import Router

# Router attribute -> (metric name without _total, help)
COUNTERS = {
    "routed": ("zchannels_broker_routed_frames", "Point-to-point bus messages routed"),
    "unroutable": ("zchannels_broker_unroutable", "Bus messages handed back as UNROUTABLE"),
    "malformed": ("zchannels_broker_malformed", "Malformed bus messages dropped"),
    "refused": ("zchannels_broker_refused",
                "Bus messages dropped because their sender's role may not send their kind"),
    "placed_stale": ("zchannels_broker_placed_stale",
                     "Connects and joins placed while no worker had been heard from recently"),
    "dropped_full": ("zchannels_broker_dropped_full",
                     "Bus messages dropped because the destination's queue was full"),
    "dropped_while_warming": ("zchannels_broker_dropped_while_warming",
                              "Messages for peers not yet reconnected after a broker start, dropped because too many were held"),
    "worker_deaths": ("zchannels_broker_worker_deaths",
                      "Workers declared dead (unreachable or silent; a BYE does not count)"),
    "edge_losses": ("zchannels_broker_edge_losses",
                    "Edges declared dead (unreachable or silent; a BYE does not count)"),
}


class BrokerCollector:
    def __init__(self, router: "Router", monitor: "BusMonitor | None" = None):
        self.router = router
        self.monitor = monitor

    def collect(self):
        router = self.router
        for attr, (name, text) in COUNTERS.items():
            yield CounterMetricFamily(name, text, value=getattr(router, attr, 0))
        if self.monitor is not None:
            closed = CounterMetricFamily(
                "zchannels_broker_bus_disconnects", "Bus connections closed, per endpoint: peers "
                "that left, and peers cut off for a message over --max-bus-message", labels=["endpoint"])
            for endpoint, count in list(self.monitor.disconnects.items()):
                closed.add_metric([endpoint], count)
            yield closed
        yield GaugeMetricFamily("zchannels_broker_workers", "Workers live in the registry",
                                value=len(router.workers))
        yield GaugeMetricFamily("zchannels_broker_edges", "Edges live in the registry",
                                value=len(router.edges))


def metrics_host(bus: str) -> str:
    """The host of tcp://HOST:PORT, where the metrics are served too (`*` = every address)."""
    host = bus.partition("://")[2].rpartition(":")[0].strip("[]")
    return "0.0.0.0" if host in ("*", "") else host


def serve(router: "Router", host: str, port: int, monitor: "BusMonitor | None" = None):
    """Start the /metrics thread; return the server (its ``server_port`` is the real port)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(router, monitor))
    ProcessCollector(registry=registry)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
