"""examples/django end to end: broker + edge + 2 workers running examples/notifications/channels.py,
the one-file Django project under `runserver`, real HTTP logins (with Django's CSRF tokens),
and phoenix.js 1.8 in Node joining with the token the app rendered into its page.
"""
from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import pytest

from tests.conftest import Cluster, wait_until
from tests.webapps import (CHROMIUM, CSRF_FIELD, WebSession, assert_connect_refused, bad_tokens,
                           join_notifications, log_in, login_form, notify_until_received,
                           run_pages_in_chromium, start_web_app)

pytest.importorskip("django")

SECRET = "django-example-" + "s3cret" * 6


@pytest.fixture(scope="module")
def system():
    env = {"ZCHANNELS_SECRET_KEY_BASE": SECRET}
    cluster = Cluster(app="examples/notifications/channels.py", edges=1, workers=2, env=env)
    web = None
    try:
        web, url = start_web_app(
            "examples.django.app", "runserver", "127.0.0.1:0", "--noreload",
            env={**env, "ZCHANNELS_BUS": cluster.bus, "ZCHANNELS_EDGE_URL": cluster.http_urls[0]},
            started=r"Starting development server at (?P<url>http://127\.0\.0\.1:\d+)/")
        yield cluster, url
    finally:
        if web is not None:
            assert web.stop() in (0, -signal.SIGTERM), web.stderr_text()[-3000:]
            assert "Traceback" not in web.stderr_text(), web.stderr_text()[-3000:]
            web.cleanup()
        cluster.stop()
        cluster.cleanup()


@pytest.mark.timeout(60)
def test_logged_in_user_joins_with_the_page_token_and_gets_what_the_app_publishes(system, js_client):
    cluster, url = system
    alice = log_in(url, "alice")
    assert alice.page.app["user"] == "alice"
    assert alice.page.app["socket-url"] == cluster.ws_urls[0]
    assert f"{cluster.http_urls[0]}/js/phoenix.js" in alice.page.scripts

    client = join_notifications(js_client, alice.page, "alice")
    bob = log_in(url, "bob")
    notify_until_received(bob, client, "alice")
    body = f"your invoice is paid {uuid.uuid4().hex[:8]}"
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
def test_posts_without_the_csrf_token_are_refused(system):
    _, url = system
    stranger = WebSession(url)
    login_form(stranger)                               # has the CSRF cookie, not the form field
    assert stranger.post("/login", {"username": "eve"}).status == 403
    erin = log_in(url, "erin")
    assert erin.session.post("/notify", {"to": "erin", "body": "hi"}).status == 403
    assert erin.notify("erin", "hi").status == 202    # the page's form field makes it pass


@pytest.mark.timeout(30)
def test_bad_logins_and_notifications_get_clear_errors(system):
    _, url = system
    anonymous = WebSession(url)
    refused = anonymous.post("/login", {"username": "no spaces allowed", **login_form(anonymous)})
    assert refused.status == 400 and "1 to 32 letters" in refused.body
    assert anonymous.post("/notify", {"to": "alice", "body": "hi", **login_form(anonymous)}).status == 401
    dave = log_in(url, "dave")
    for to, body, error in [("al ice", "hi", "to must be a user name"),
                            ("alice", "", "body must be 1 to 500 characters"),
                            ("alice", "x" * 501, "body must be 1 to 500 characters")]:
        answer = dave.notify(to, body)
        assert (answer.status, json.loads(answer.body)) == (400, {"error": error})
    logged_out = dave.session.post("/logout", {CSRF_FIELD: dave.page.inputs[CSRF_FIELD]})
    assert logged_out.status == 200 and 'name="username"' in logged_out.body
    assert dave.notify("alice", "hi").status == 401


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
def test_the_page_in_chromium_logs_in_joins_and_shows_notifications_sent_from_another_page(system):
    _, url = system
    shown = run_pages_in_chromium(url, "django")
    assert shown["alice"]["status"] == shown["bob"]["status"] == "joined"
    assert "bob: hello alice, from bob's page" in shown["alice"]["notifications"]
    assert "alice: a note to myself" in shown["alice"]["notifications"]
    assert shown["bob"]["notifications"] == []        # published to alice only
