"""The chat page in headless Chromium: a WebSocket tab and a LongPoll tab talk to each other.

Screenshots of both tabs are kept in tests/artifacts/.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT as REPO_ROOT, Cluster

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")


@pytest.mark.timeout(120)
def test_chat_page_websocket_tab_and_longpoll_tab_see_each_other_and_who_is_online():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(app="examples/chat/channels.py", edges=1, workers=2,
                      edge_args=["--static", "examples/chat/static"])
    try:
        run = subprocess.run(["node", "tests/js/browser_chat.js", cluster.http_urls[0], str(ARTIFACTS)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, f"browser run failed:\n{run.stderr[-3000:]}\n{cluster.stderr()}"
        shown = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        cluster.stop()
        cluster.cleanup()
    for tab in ("websocket_tab", "longpoll_tab"):
        assert "hello from the websocket tab" in shown[tab]
        assert "hello from the longpoll tab" in shown[tab]
    for tab in ("websocket_tab", "longpoll_tab"):   # phoenix.js Presence on the page
        assert "wsuser" in shown["online"][tab] and "lpuser" in shown["online"][tab]
    assert "lpuser" in shown["online_after_ws_closed"] and "wsuser" not in shown["online_after_ws_closed"]
    assert shown["longpoll_requests"] > 0, "the LongPoll tab never used /socket/longpoll"
    for name in ("chat-websocket-tab.png", "chat-longpoll-tab.png"):
        assert (ARTIFACTS / name).stat().st_size > 1000


@pytest.mark.timeout(120)
def test_chromium_agrees_permessage_deflate_and_shows_a_compressed_broadcast():
    """Edge with --compress: Chromium's offer is agreed (no context takeover either way) and a
    1 KB chat line broadcast through the fast lane's compressed frame reaches both tabs."""
    cluster = Cluster(app="examples/chat/channels.py", edges=1, workers=1,
                      edge_args=["--static", "examples/chat/static", "--compress"])
    try:
        run = subprocess.run(["node", "tests/js/browser_deflate.js", cluster.http_urls[0]],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, f"browser run failed:\n{run.stderr[-3000:]}\n{cluster.stderr()}"
        shown = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        cluster.stop()
        cluster.cleanup()
    agreed = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    assert shown["extensions"] == [agreed, agreed] and shown["shown"] and shown["length"] > 1000
