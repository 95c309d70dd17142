"""Prometheus metrics of one edge, served at GET /metrics on the edge's HTTP port.

The hot path only does plain int adds (``hub.frames_in``, ``hub.frames_out``,
``hub.bytes_out``, ``fastlane.deliveries`` / ``fastlane.bytes_out`` and the
``hub.stats`` counters); this collector reads them when Prometheus scrapes, so
there is no per-message call into prometheus_client.  The gauges (connections,
joined channels) are counted at scrape time, a walk over the connection table.

With ``--processes N`` every edge process serves its own /metrics on the shared
port, and the kernel picks which one answers a scrape: run separate edges on
separate ports (``--reuse-port`` off) when each must be scraped.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from tornado import web

if TYPE_CHECKING:
    from zchannels.edge.hub import EdgeHub

TRANSPORTS = {"ws": "websocket", "ws-deflate": "websocket",   # Connection.transport.frame_kind -> label
              "longpoll": "longpoll"}

# hub.stats key -> (metric name without _total, help)
STATS = {
    "slow_consumer_closes": ("zchannels_edge_slow_consumer_closes",
                             "Connections closed (1013) or LongPoll sessions ended for not reading"),
    "heartbeat_timeouts": ("zchannels_edge_heartbeat_timeouts",
                           "WebSockets closed (1001) after --heartbeat-timeout without a frame"),
    "rate_limited": ("zchannels_edge_rate_limit_refusals",
                     "Client messages refused with {\"reason\":\"rate limited\"}"),
    "rate_limit_closes": ("zchannels_edge_rate_limit_closes",
                          "Connections closed (1008) for staying over --max-rate"),
    "bad_frames": ("zchannels_edge_bad_frames",
                   "Undecodable client frames and malformed bus frames dropped"),
    "inbound_budget_closes": ("zchannels_edge_inbound_budget_closes",
                              "WebSockets closed (1013) for taking the edge over "
                              "--max-inbound-buffered with unfinished messages"),
    "close_aborts": ("zchannels_edge_close_aborts",
                     "Connections cut off because they did not read their close frame"),
    "disconnects": ("zchannels_edge_socket_id_disconnects",
                    "Connections closed by a \"disconnect\" broadcast to their socket id"),
    "foreign_frames": ("zchannels_edge_foreign_frames",
                       "Bus frames about a channel from a peer that does not hold it, dropped"),
    "connect_retries": ("zchannels_edge_connect_retries",
                        "Connects sent again for placement after no answer in 1.7 s"),
    "join_retries": ("zchannels_edge_join_retries",
                     "Joins sent again for placement after no answer in 1.7 s"),
    "late_joins_ended": ("zchannels_edge_late_joins_ended",
                         "Join oks that came after their channel stopped waiting (the client "
                         "left, or a copy sent again was answered first); the instance was ended"),
    "connect_refusals": ("zchannels_edge_connect_refusals",
                         "Connects refused 403 (the app's connect, vsn, subprotocol, auth token)"),
    "origin_refusals": ("zchannels_edge_origin_refusals",
                        "Upgrades (403) and LongPoll requests ({\"status\":403}) from an origin "
                        "not allowed"),
    "connect_unavailable": ("zchannels_edge_connect_unavailable",
                            "Connects refused 503: no worker answered, or the bus is down"),
    "order_given_up": ("zchannels_edge_order_given_up",
                       "Messages handled out of order: over 256 waiting behind a pending join, or "
                       "a join unanswered for 5 s"),
    "undelivered": ("zchannels_edge_undelivered",
                    "Messages for a worker the bus refused (queue full, over the bus limit); a "
                    "push among them got an error reply"),
    "outage_replies": ("zchannels_edge_outage_replies",
                       "Pushes still unanswered 4 s after a bus outage ended, answered with an error"),
    "sync_timeouts": ("zchannels_edge_sync_timeouts",
                      "Workers taken for gone (their channels errored) for saying nothing within "
                      "1.5 s of the edge's channel list after a broker restart or a bus silence"),
    "status_refused": ("zchannels_edge_status_refused",
                       "Status page requests and zchannels:status joins refused (wrong, missing "
                       "or no status token)"),
    # HTTP before the upgrade (edge/httplimits.py, edge/admission.py, docs/security.md)
    "header_timeouts": ("zchannels_edge_http_header_timeouts",
                        "Requests answered 408 for headers not complete within --header-timeout"),
    "body_timeouts": ("zchannels_edge_http_body_timeouts",
                      "Requests answered 408 for a body not complete within --body-timeout"),
    "body_too_large": ("zchannels_edge_http_body_too_large",
                       "Requests answered 413 for a body over their route's limit"),
    "body_inflight_refusals": ("zchannels_edge_http_body_inflight_refusals",
                               "Requests answered 503 for going over --max-body-inflight"),
    "pending_peer_refusals": ("zchannels_edge_pending_peer_refusals",
                              "Connections refused at accept: --max-pending-per-peer"),
    "pending_total_refusals": ("zchannels_edge_pending_total_refusals",
                               "Connections refused at accept: --max-pending"),
    "descriptor_reserve_refusals": ("zchannels_edge_descriptor_reserve_refusals",
                                    "Connections refused at accept to keep the descriptor reserve"),
    "longpoll_posts_refused": ("zchannels_edge_longpoll_posts_refused",
                               "LongPoll POSTs answered 410 from their headers, body unread"),
    "api_key_refusals": ("zchannels_edge_api_key_refusals",
                         "POST /api/broadcast answered 401 from its headers, body unread"),
    "tls_handshake_failures": ("zchannels_edge_tls_handshake_failures",
                               "TLS handshakes that failed (plain HTTP on the TLS port, a client "
                               "that does not trust the certificate)"),
}


class EdgeCollector:
    """Reads one hub's counters at scrape time."""

    def __init__(self, hub: "EdgeHub"):
        self.hub = hub

    def collect(self):
        hub = self.hub
        by_transport = dict.fromkeys(TRANSPORTS.values(), 0)
        joined = 0
        for conn in list(hub.connections.values()):
            label = TRANSPORTS.get(conn.transport.frame_kind, conn.transport.frame_kind)
            by_transport[label] = by_transport.get(label, 0) + 1
            joined += len(conn.channels)
        g = GaugeMetricFamily("zchannels_edge_connections", "Client connections open on this edge",
                              labels=["transport"])
        for transport, n in by_transport.items():
            g.add_metric([transport], n)
        yield g
        yield GaugeMetricFamily("zchannels_edge_channels_joined",
                                "Channels joined (or joining) by this edge's clients", value=joined)
        yield GaugeMetricFamily("zchannels_edge_inbound_buffered_bytes",
                                "Bytes of unfinished WebSocket messages held beyond each "
                                "connection's free 64 KiB, against --max-inbound-buffered",
                                value=hub.inbound_budget.held)
        fastlane = hub.fastlane
        yield CounterMetricFamily("zchannels_edge_frames_in", "Phoenix messages received from clients",
                                  value=hub.frames_in)
        yield CounterMetricFamily("zchannels_edge_frames_out",
                                  "Phoenix messages sent to clients (replies, pushes, broadcasts)",
                                  value=hub.frames_out + fastlane.deliveries)
        yield CounterMetricFamily("zchannels_edge_bytes_out",
                                  "Bytes of Phoenix messages sent to clients, before transport framing",
                                  value=hub.bytes_out + fastlane.bytes_out)
        yield CounterMetricFamily("zchannels_edge_fastlane_deliveries",
                                  "Broadcasts written to a client by the fast lane",
                                  value=fastlane.deliveries)
        yield CounterMetricFamily("zchannels_edge_fastlane_malformed",
                                  "Broadcasts from the bus dropped as malformed", value=fastlane.malformed)
        for key, (name, text) in STATS.items():
            yield CounterMetricFamily(name, text, value=hub.stats.get(key, 0))


def make_registry(hub: "EdgeHub") -> CollectorRegistry:
    """An edge-local registry: the hub's counters and this process's CPU, memory and files."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(hub))
    ProcessCollector(registry=registry)
    return registry


class MetricsHandler(web.RequestHandler):
    """GET /metrics in the Prometheus text format."""

    def initialize(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.set_header("Cache-Control", "no-store")
        self.finish(generate_latest(self.registry))
