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
def test_guide_page_round_trips_a_message_between_an_anonymous_tab_and_a_tab_with_a_user_token():
    """examples/guide's own page, as `zchannels dev examples/guide/channels.py` serves it."""
    from zchannels.workers.token import sign
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    secret = "the guide's secret_key_base, for the browser test"
    cluster = Cluster(app="examples/guide/channels.py", edges=1, workers=2,
                      edge_args=["--static", "examples/guide/static"],
                      env={"ZCHANNELS_SECRET_KEY_BASE": secret})
    try:
        run = subprocess.run(["node", "tests/js/browser_guide.js", cluster.http_urls[0], str(ARTIFACTS),
                              sign(secret, "user socket", 42)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, f"browser run failed:\n{run.stderr[-3000:]}\n{cluster.stderr()}"
        shown = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        cluster.stop()
        cluster.cleanup()
    for tab in ("anonymous_tab", "user_tab"):
        # The guide's line: `[${Date()}] ${payload.body}`, one per message, each once.
        texts = [item.split("] ", 1)[1] for item in shown[tab]]
        assert texts == ["hello from the anonymous tab", "hello from the user tab"], shown[tab]
        assert all(item.startswith("[") for item in shown[tab])
        assert [line for line in shown["console"][tab] if line.startswith("Joined successfully")]
    assert shown["input_after_enter"] == ""
    assert (ARTIFACTS / "guide-anonymous-tab.png").stat().st_size > 1000


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
