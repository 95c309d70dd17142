"""The live status page: every edge and worker publishes a snapshot of itself on the system
topic "zchannels:status" once a second; /status on any edge is a phoenix.js client of it.

The browser test keeps a screenshot in tests/artifacts/status.png.
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT as REPO_ROOT, Cluster, Proc, wait_until
from tests.rawws import RawWS
from zchannels.workers import Channel, Socket

STATUS = "zchannels:status"
TOKEN = "status-test-token"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"


@pytest.fixture(scope="module")
def cluster():
    """Broker + 2 edges + 2 workers whose edges serve the status page with TOKEN."""
    c = Cluster(env={"ZCHANNELS_STATUS_TOKEN": TOKEN})
    yield c
    c.stop()
    c.cleanup()


def snapshots(client, kind: str, since: int = 0) -> dict[str, dict]:
    """The latest snapshot of each process of `kind` ("edge" or "worker") received so far."""
    return {m["payload"]["id"]: m["payload"] for m in client.messages("status", kind, since)}


def test_status_topic_carries_snapshots_of_every_edge_and_worker(cluster, js_client):
    c = js_client("status")
    c.connect(cluster.ws_urls[0])
    joined = c.join("status", STATUS, {"status_token": TOKEN}, on=["edge", "worker"])
    assert joined["status"] == "ok", joined
    edge_ids = set(cluster.edge_ids)
    worker_ids = {r["id"] for r in cluster.worker_ready}
    wait_until(lambda: set(snapshots(c, "edge")) >= edge_ids and set(snapshots(c, "worker")) >= worker_ids,
               timeout=5, message=lambda: f"edges {set(snapshots(c, 'edge'))} / {edge_ids}, "
                                          f"workers {set(snapshots(c, 'worker'))} / {worker_ids}")
    # A second round, so this client's own join shows in its edge's counters.
    mark = c.mark()
    wait_until(lambda: cluster.edge_ids[0] in snapshots(c, "edge", mark), timeout=5)
    edge = snapshots(c, "edge", mark)[cluster.edge_ids[0]]
    assert edge["connections"] >= 1 and edge["channels"] >= 1
    assert [STATUS, 1] in edge["topics"]
    assert edge["frames_in"] >= 1 and edge["frames_out"] >= 1 and edge["uptime"] >= 0
    workers = snapshots(c, "worker")
    pids = {int(r["pid"]) for r in cluster.worker_ready}
    assert {w["pid"] for w in workers.values() if w["id"] in worker_ids} == pids
    assert {w["slot"] for w in workers.values() if w["id"] in worker_ids} == {0, 1}
    # Exactly one worker holds the status channel of this client.
    assert sum(w["channels"] for w in workers.values() if w["id"] in worker_ids) >= 1


def test_other_system_topics_are_unmatched_even_when_the_app_routes_everything(cluster, js_client):
    c = js_client("sys")
    c.connect(cluster.ws_urls[1])
    refused = c.join("other", "zchannels:secret")
    assert refused["status"] == "error" and refused["response"] == {"reason": "unmatched topic"}


def test_apps_cannot_declare_routes_under_the_system_prefix():
    socket = Socket()
    with pytest.raises(ValueError, match="reserved"):
        socket.channel("zchannels:*", Channel)
    socket.channel("zchannelsish:*", Channel)   # only the prefix with its colon is reserved


def test_status_page_is_served_by_every_edge(cluster):
    for url in cluster.http_urls:
        with urllib.request.urlopen(f"{url}/status?status_token={TOKEN}", timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/html")
            body = resp.read().decode()
        assert '<script src="/js/phoenix.js"></script>' in body and STATUS in body
        assert "http://" not in body and "https://" not in body   # no external assets


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def raw_join_status(url: str, payload: dict) -> dict:
    ws = RawWS.connect(url)
    try:
        ws.send_json(["1", "1", STATUS, "phx_join", payload])
        return ws.recv_json(5)[4]
    finally:
        ws.close()


def test_status_page_needs_the_token(cluster):
    url = cluster.http_urls[0]
    before = refusals(url)
    assert http_status(f"{url}/status") == 403
    assert http_status(f"{url}/status?status_token=wrong") == 403
    assert http_status(f"{url}/status?status_token={TOKEN}") == 200
    assert refusals(url) == before + 2
    assert "GET /status refused: wrong or missing status token" in cluster.edge_procs[0].stderr_text()


def refusals(edge_url: str) -> float:
    with urllib.request.urlopen(f"{edge_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return float(re.search(r"^zchannels_edge_status_refused_total (\S+)$", text, re.M).group(1))


def test_joining_the_status_topic_without_the_token_is_unauthorized(cluster):
    url = cluster.raw_url(0)
    before = refusals(cluster.http_urls[0])
    for payload in ({}, {"status_token": "wrong"}, {"status_token": 12}, {"status_token": TOKEN[:-1]}):
        assert raw_join_status(url, payload) == {"status": "error", "response": {"reason": "unauthorized"}}
    assert raw_join_status(url, {"status_token": TOKEN})["status"] == "ok"
    assert refusals(cluster.http_urls[0]) == before + 4
    assert "join zchannels:status refused: wrong or missing status token" in cluster.edge_procs[0].stderr_text()


def test_without_a_token_the_status_page_and_topic_are_off(module_cluster_factory):
    off = module_cluster_factory(edges=1, workers=1)
    assert http_status(f"{off.http_urls[0]}/status") == 404
    assert http_status(f"{off.http_urls[0]}/status?status_token=") == 404
    assert raw_join_status(off.raw_url(0), {"status_token": ""}) == \
        {"status": "error", "response": {"reason": "unauthorized"}}
    assert "status page: off" in off.edge_procs[0].stderr_text()


def test_dev_serves_the_status_page_with_a_generated_token_it_prints():
    proc = Proc("zchannels", "dev", "--bus", "tcp://127.0.0.1:0", "--port", "0", "-n", "1",
                "--log-level", "info", "tests/apps/e2e_app.py", name="dev",
                env={"ZCHANNELS_STATUS_TOKEN": ""})
    try:
        proc.wait_for(lambda: "status page: http" in proc.stderr_text(), 20, "the status page's URL")
        page = re.search(r"status page: (http://\S+/status\?status_token=(\S+))", proc.stderr_text())
        url, token = page.group(1), page.group(2)
        assert len(token) >= 16
        assert http_status(url) == 200
        assert http_status(url.replace(token, "x" + token[1:])) == 403
        line = proc.wait_for(lambda: next((l for l in proc.lines if l.startswith("[edge] READY")), None),
                             20, "the edge's READY line")
        http = dict(kv.split("=", 1) for kv in line.split()[2:])["http"]
        ws_url = http.replace("http://", "ws://") + "/socket/websocket?vsn=2.0.0"
        proc.wait_for(lambda: any(l.startswith("[workers] READY") for l in proc.lines), 20, "a worker")
        assert raw_join_status(ws_url, {"status_token": token})["status"] == "ok"
        assert raw_join_status(ws_url, {})["response"] == {"reason": "unauthorized"}
    finally:
        assert proc.stop(15) == 0
        proc.cleanup()


class LineReader:
    """stdout lines of a child, with deadlines."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def json_with(self, key: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"browser printed no {key!r} within {timeout}s") from None
            if line is None:
                raise AssertionError(f"browser exited before printing {key!r}")
            if line.startswith("{") and key in (msg := json.loads(line)):
                return msg[key]


LOAD_CLIENTS = 16
LOAD_PERIOD_MS = 250    # each load client pushes "bcast" 4 times a second


def read_json(reader: LineReader, proc: subprocess.Popen, key: str, timeout: float, cluster: Cluster):
    """The next stdout JSON line of `proc` with `key`; on failure its stderr and the cluster's."""
    try:
        return reader.json_with(key, timeout)
    except AssertionError as exc:
        proc.kill()
        raise AssertionError(f"{exc}\n{proc.stderr.read()[-3000:]}\n{cluster.stderr()}") from None


def node(*args: str) -> subprocess.Popen:
    return subprocess.Popen(["node", *args], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_charts_show_the_load(before: dict, later: dict) -> None:
    """The page's chart history (window.statusHistory, read twice, 5 samples apart) during
    the load: every series has a point per sample, and each chart drew them all."""
    for charts in (before, later):
        series = charts["series"]
        assert len(series["t"]) >= 2
        assert all(len(values) == len(series["t"]) for values in series.values()), series
        assert {k: charts["drawn"][k] for k in ("connections", "joins", "messages")} == \
            dict.fromkeys(("connections", "joins", "messages"), len(series["t"]))
        last = {k: v[-1] for k, v in series.items()}
        assert last["connections"] >= LOAD_CLIENTS + 1, series["connections"]   # + the page
        assert last["frames_in"] > 0 and last["deliveries"] > 0, last
        assert last["frames_out"] >= last["deliveries"] - 1e-6   # frames out count deliveries
        # Each push is broadcast to all the load's clients, over both edges: the sum shows it.
        assert last["deliveries"] > 2 * last["frames_in"], last
        assert max(series["joins"]) > 0, series["joins"]
        assert charts["legend"]["frames_in"] == last["frames_in"]
        assert charts["legend"]["connections"] == last["connections"]
    assert later["series"]["t"][-1] > before["series"]["t"][-1]
    assert len(later["series"]["t"]) >= len(before["series"]["t"]) + 5


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
@pytest.mark.timeout(150)
def test_status_page_shows_the_cluster_charts_its_load_and_a_worker_restart_live():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(edges=2, workers=2, env={"ZCHANNELS_STATUS_TOKEN": TOKEN})
    browser = load = None
    try:
        browser = node("tests/js/browser_status.js", cluster.http_urls[1], str(ARTIFACTS), "2", "2", TOKEN)
        out = LineReader(browser)
        shown = read_json(out, browser, "shown", 30, cluster)
        assert {e["edgeId"] for e in shown["edges"]} == set(cluster.edge_ids)
        pids = {int(r["pid"]) for r in cluster.worker_ready}
        assert {int(w["pid"]) for w in shown["workers"]} == pids
        assert shown["conn"] == "live"
        assert int(shown["cards"]["connections"]) >= 1   # the page's own

        load = node("tests/js/status_load.js", str(LOAD_CLIENTS), str(LOAD_PERIOD_MS), "echo:status-load",
                    *cluster.ws_urls)
        load_out = LineReader(load)
        assert read_json(load_out, load, "joined", 30, cluster) == LOAD_CLIENTS
        browser.stdin.write(json.dumps({"load": LOAD_CLIENTS}) + "\n")
        browser.stdin.flush()
        before, later = read_json(out, browser, "charts", 40, cluster)
        assert_charts_show_the_load(before, later)

        # The worker dies under load: its channels rejoin on the other one.
        victim = next(r for r in cluster.worker_ready if int(r["pid"]) == min(pids))
        os.kill(int(victim["pid"]), signal.SIGKILL)
        new = cluster.wait_new_worker(pids, timeout=15)
        browser.stdin.write(json.dumps({"killed": int(victim["pid"])}) + "\n")
        browser.stdin.close()
        after = read_json(out, browser, "after", 40, cluster)
        shown_pids = {int(w["pid"]) for w in after["workers"]}
        assert int(victim["pid"]) not in shown_pids and int(new["pid"]) in shown_pids
        assert any(f"pid {victim['pid']}" in e and "down" in e for e in after["events"]), after["events"]
        assert any(f"pid {new['pid']}" in e and "new worker" in e for e in after["events"]), after["events"]
        restarts = after["charts"]["restarts"]
        assert victim["id"] in {r["id"] for r in restarts if r["kind"] == "down"}, restarts
        assert new["id"] in {r["id"] for r in restarts if r["kind"] == "up"}, restarts
        assert after["charts"]["legend"]["down"] >= 1 and after["charts"]["legend"]["up"] >= 1
        assert browser.wait(10) == 0, browser.stderr.read()[-3000:]

        load.stdin.close()
        stopped = read_json(load_out, load, "stopped", 20, cluster)
        assert stopped["ok"] > 0, stopped
        assert load.wait(10) == 0, load.stderr.read()[-3000:]
    finally:
        for proc in (browser, load):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(5)
        cluster.stop()
        cluster.cleanup()
    assert (ARTIFACTS / "status.png").stat().st_size > 1000
