"""/metrics of the edge, the broker and the workers supervisor, scraped like Prometheus does,
and `--log-format json`.

One cluster with metrics on (broker and supervisor on free ports, announced on stdout) and
JSON logs; raw WebSocket clients drive load, and the counters must move.
"""
from __future__ import annotations

import json
import os
import signal
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Cluster, wait_until
from tests.rawws import RawWS


def scrape(url: str) -> dict[str, dict]:
    """GET url; every sample by name -> {labels tuple: value}. Fails unless it parses cleanly."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """One sample's value; labels given must match, other labels are summed over."""
    total = 0.0
    for key, v in samples.get(name, {}).items():
        if all((k, labels[k]) in key for k in labels):
            total += v
    return total


@pytest.fixture(scope="module")
def metrics_cluster():
    c = Cluster(edges=1, workers=2, broker_args=["--metrics-port", "0", "--log-format", "json"],
                worker_args=["--metrics-port", "0", "--log-format", "json"],
                edge_args=["--log-format", "json"])
    try:
        c.broker_metrics = c.broker.ready[0]["metrics"]
        line = c.supervisor.wait_for(
            lambda: next((l for l in c.supervisor.lines if l.startswith("METRICS ")), None),
            10, "METRICS line")
        c.workers_metrics = line.split()[1]
        c.edge_metrics = c.http_urls[0] + "/metrics"
        yield c
    finally:
        c.stop()
        c.cleanup()


def join_and_ping(cluster: Cluster, topic: str, pings: int) -> RawWS:
    ws = RawWS.connect(cluster.raw_url(0))
    ws.send_json(["1", "1", topic, "phx_join", {}])
    assert ws.recv_json(5)[4]["status"] == "ok"
    for i in range(pings):
        ws.send_json(["1", str(i + 2), topic, "ping", {"i": i}])
        assert ws.recv_json(5)[4] == {"status": "ok", "response": {"i": i}}
    return ws


def test_every_process_serves_metrics_that_parse(metrics_cluster):
    edge = scrape(metrics_cluster.edge_metrics)
    broker = scrape(metrics_cluster.broker_metrics)
    workers = scrape(metrics_cluster.workers_metrics)
    for name in ("zchannels_edge_connections", "zchannels_edge_channels_joined",
                 "zchannels_edge_frames_in_total", "zchannels_edge_frames_out_total",
                 "zchannels_edge_bytes_out_total", "zchannels_edge_fastlane_deliveries_total",
                 "zchannels_edge_slow_consumer_closes_total", "zchannels_edge_heartbeat_timeouts_total",
                 "zchannels_edge_rate_limit_refusals_total", "zchannels_edge_rate_limit_closes_total",
                 "zchannels_edge_bad_frames_total", "process_resident_memory_bytes"):
        assert name in edge, name
    for name in ("zchannels_broker_routed_frames_total", "zchannels_broker_unroutable_total",
                 "zchannels_broker_malformed_total", "zchannels_broker_dropped_full_total",
                 "zchannels_broker_worker_deaths_total", "zchannels_broker_workers",
                 "zchannels_broker_edges"):
        assert name in broker, name
    assert value(broker, "zchannels_broker_workers") == 2
    assert value(broker, "zchannels_broker_edges") == 1
    assert "zchannels_worker_channel_instances" in workers
    assert "zchannels_worker_restarts_total" in workers


def test_load_moves_the_counters(metrics_cluster):
    c = metrics_cluster
    before_edge, before_broker = scrape(c.edge_metrics), scrape(c.broker_metrics)
    clients = [join_and_ping(c, f"echo:metrics-load-{i}", pings=5) for i in range(3)]
    try:
        # A broadcast every client of one topic receives through the fast lane.
        watcher = join_and_ping(c, "echo:metrics-load-0", pings=0)
        clients.append(watcher)
        clients[0].send_json(["1", "99", "echo:metrics-load-0", "bcast", {"hello": 1}])
        assert watcher.recv_json(5)[3] == "bcast"

        edge = scrape(c.edge_metrics)
        assert value(edge, "zchannels_edge_connections", transport="websocket") >= 4
        assert value(edge, "zchannels_edge_channels_joined") >= 4
        frames_in = value(edge, "zchannels_edge_frames_in_total") - \
            value(before_edge, "zchannels_edge_frames_in_total")
        assert frames_in >= 4 + 15 + 1          # joins, pings, the bcast
        assert value(edge, "zchannels_edge_frames_out_total") > \
            value(before_edge, "zchannels_edge_frames_out_total") + 19
        assert value(edge, "zchannels_edge_bytes_out_total") > value(before_edge, "zchannels_edge_bytes_out_total")
        assert value(edge, "zchannels_edge_fastlane_deliveries_total") >= 1

        # The broker's Python loop routes only what it places (4 connects and 4 joins, perhaps
        # a retry); the 15 pings, their replies and the join replies go through its C proxy.
        broker = scrape(c.broker_metrics)
        routed = value(broker, "zchannels_broker_routed_frames_total") - \
            value(before_broker, "zchannels_broker_routed_frames_total")
        assert 8 <= routed < 15, routed

        # Channel instances are refreshed with each worker heartbeat (0.5 s).
        workers = wait_until(lambda: (lambda w: value(w, "zchannels_worker_channel_instances") >= 4 and w)(
            scrape(c.workers_metrics)), 5, message="channel instances never reached 4")
        assert value(workers, "zchannels_worker_handler_seconds_count", callback="handle_in") >= 16
        assert value(workers, "zchannels_worker_handler_seconds_count", callback="join") >= 4
        assert value(workers, "zchannels_worker_handler_seconds_bucket", callback="join", le="+Inf") >= 4
    finally:
        for ws in clients:
            ws.close()
    # The gauges come down once the clients are gone.
    wait_until(lambda: value(scrape(c.edge_metrics), "zchannels_edge_connections") == 0, 5,
               message="edge connections gauge did not return to 0")
    wait_until(lambda: value(scrape(c.workers_metrics), "zchannels_worker_channel_instances") == 0, 5,
               message="channel instances did not return to 0")


def test_handler_crash_is_counted(metrics_cluster):
    c = metrics_cluster
    ws = join_and_ping(c, "echo:metrics-crash", pings=0)
    try:
        before = value(scrape(c.workers_metrics), "zchannels_worker_handler_crashes_total", callback="handle_in")
        ws.send_json(["1", "2", "echo:metrics-crash", "raise", {}])
        assert ws.recv_json(5) == ["1", "2", "echo:metrics-crash", "phx_reply",
                                   {"status": "error", "response": {"reason": "channel lost"}}]
        assert ws.recv_json(5)[3] == "phx_error"
        wait_until(lambda: value(scrape(c.workers_metrics), "zchannels_worker_handler_crashes_total",
                                 callback="handle_in") == before + 1, 5)
    finally:
        ws.close()


def test_killed_worker_counts_as_restart_and_worker_death(metrics_cluster):
    c = metrics_cluster
    workers_before = scrape(c.workers_metrics)
    broker_before = scrape(c.broker_metrics)
    victim = c.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    c.wait_new_worker(c.worker_pids + [victim])
    workers = scrape(c.workers_metrics)
    assert value(workers, "zchannels_worker_restarts_total") == \
        value(workers_before, "zchannels_worker_restarts_total") + 1
    wait_until(lambda: value(scrape(c.broker_metrics), "zchannels_broker_worker_deaths_total") >=
               value(broker_before, "zchannels_broker_worker_deaths_total") + 1, 10,
               message="the broker did not count the worker death")
    # The dead worker's live gauge file is gone; the counters and histograms it wrote stay.
    message = next(m for m in (json.loads(line)["message"] for line in c.supervisor.stderr_text().splitlines())
                   if m.startswith("metrics at "))
    names = os.listdir(message.rpartition("(directory ")[2].rstrip(")"))
    assert not any(n.endswith(f"_{victim}.db") and n.startswith("gauge_live") for n in names), names
    assert value(workers, "zchannels_worker_handler_seconds_count") >= \
        value(workers_before, "zchannels_worker_handler_seconds_count")


def test_log_format_json_gives_one_object_per_line(metrics_cluster):
    c = metrics_cluster
    kinds = set()
    for proc in (c.broker, c.edge_procs[0], c.supervisor):
        lines = [l for l in proc.stderr_text().splitlines() if l.strip()]
        assert lines, proc.name
        for line in lines:
            entry = json.loads(line)
            assert {"time", "level", "process", "pid", "logger", "message"} <= entry.keys(), line
            kinds.add(entry["process"])
    assert {"broker", "edge", "workers", "worker0", "worker1"} <= kinds
