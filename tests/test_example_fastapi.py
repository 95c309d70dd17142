"""examples/fastapi end to end: broker + edge + 2 workers running examples/notifications/channels.py,
the FastAPI app under uvicorn, real HTTP logins, and phoenix.js 1.8 in Node joining with the
token the app rendered into its page (the `authToken` option).
"""
from __future__ import annotations

import json
import signal
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import Cluster, wait_until
from tests.webapps import (CHROMIUM, WebSession, assert_connect_refused, bad_tokens, join_notifications,
                           log_in, notify_until_received, run_pages_in_chromium, start_web_app)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SECRET = "fastapi-example-" + "s3cret" * 6


@pytest.fixture(scope="module")
def system():
    env = {"ZCHANNELS_SECRET_KEY_BASE": SECRET}
    cluster = Cluster(app="examples/notifications/channels.py", edges=1, workers=2, env=env)
    web = None
    try:
        web, url = start_web_app(
            "uvicorn", "examples.fastapi.app:app", "--host", "127.0.0.1", "--port", "0",
            env={**env, "ZCHANNELS_BUS": cluster.bus, "ZCHANNELS_EDGE_URL": cluster.http_urls[0]},
            started=r"Uvicorn running on (?P<url>http://127\.0\.0\.1:\d+)", stream="stderr")
        yield cluster, url
    finally:
        if web is not None:
            # uvicorn shuts down cleanly, then re-raises the SIGTERM it caught.
            assert web.stop() in (0, -signal.SIGTERM), web.stderr_text()[-3000:]
            assert "Application shutdown complete" in web.stderr_text()   # the publisher closed
            web.cleanup()
        cluster.stop()
        cluster.cleanup()


@pytest.mark.timeout(60)
def test_logged_in_user_joins_with_the_page_token_and_gets_what_the_app_publishes(system, js_client):
    cluster, url = system
    alice = log_in(url, "alice")
    assert alice.page.app["user"] == "alice"
    assert alice.page.app["socket-url"] == cluster.ws_urls[0]
    phoenix_js = f"{cluster.http_urls[0]}/js/phoenix.js"
    assert phoenix_js in alice.page.scripts            # the page loads phoenix.js from the edge
    with urllib.request.urlopen(phoenix_js, timeout=10) as resp:
        assert resp.status == 200 and b"authToken" in resp.read()

    client = join_notifications(js_client, alice.page, "alice")
    bob = log_in(url, "bob")
    notify_until_received(bob, client, "alice")
    body = f"your export is ready {uuid.uuid4().hex[:8]}"
    answer = bob.notify("alice", body)
    assert (answer.status, json.loads(answer.body)) == (202, {"published": True})
    client.wait_event({"type": "message", "chan": "notes", "event": "notification",
                       "payload": {"from": "bob", "body": body}}, timeout=10)


@pytest.mark.timeout(60)
def test_a_users_token_does_not_join_another_users_notifications(system, js_client):
    _, url = system
    carol = log_in(url, "carol")
    client = js_client("carol")
    assert client.connect(carol.page.app["socket-url"], authToken=carol.page.app["token"])["status"] == "open"
    answer = client.join("notes", "notifications:alice")
    assert (answer["status"], answer["response"]) == ("error", {"reason": "unauthorized"})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, token, logged", [pytest.param(*t, id=t[0]) for t in bad_tokens(SECRET)])
def test_connect_refuses_a_forged_or_absent_token(system, js_client, kind, token, logged):
    cluster, _ = system
    before = len(cluster.supervisor.stderr_text())
    assert_connect_refused(js_client(kind), cluster.ws_urls[0],
                           **({} if token is None else {"authToken": token}))
    wait_until(lambda: logged in cluster.supervisor.stderr_text()[before:], 5,
               message=lambda: cluster.supervisor.stderr_text()[before:][-2000:])


@pytest.mark.timeout(30)
def test_bad_logins_and_notifications_get_clear_errors(system):
    _, url = system
    anonymous = WebSession(url)
    refused = anonymous.post("/login", {"username": "no spaces allowed"})
    assert refused.status == 400 and "1 to 32 letters" in refused.body
    assert anonymous.post("/notify", {"to": "alice", "body": "hi"}).status == 401
    dave = log_in(url, "dave")
    for to, body, error in [("al ice", "hi", "to must be a user name"),
                            ("alice", "", "body must be 1 to 500 characters"),
                            ("alice", "x" * 501, "body must be 1 to 500 characters")]:
        answer = dave.notify(to, body)
        assert (answer.status, json.loads(answer.body)) == (400, {"error": error})
    logged_out = dave.session.post("/logout", {})
    assert logged_out.status == 200 and 'name="username"' in logged_out.body
    assert dave.notify("alice", "hi").status == 401


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
def test_the_page_in_chromium_logs_in_joins_and_shows_notifications_sent_from_another_page(system):
    _, url = system
    shown = run_pages_in_chromium(url, "fastapi")
    assert shown["alice"]["status"] == shown["bob"]["status"] == "joined"
    assert "bob: hello alice, from bob's page" in shown["alice"]["notifications"]
    assert "alice: a note to myself" in shown["alice"]["notifications"]
    assert shown["bob"]["notifications"] == []        # published to alice only
