"""examples/fastapi end to end: broker + edge + 2 workers running examples/fastapi/channels.py,
the FastAPI app under uvicorn, real HTTP logins, and phoenix.js 1.8 in Node joining with the
token the app rendered into its page (the `authToken` option).
"""
from __future__ import annotations

import itertools
import json
import signal
import urllib.request
import uuid

import pytest

from tests.conftest import Cluster, wait_until
from tests.webapps import PageData, WebSession, assert_connect_refused, start_web_app
from workers.token import sign

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SECRET = "fastapi-example-" + "s3cret" * 6
SALT = "user socket"


@pytest.fixture(scope="module")
def system():
    env = {"ZCHANNELS_SECRET_KEY_BASE": SECRET}
    cluster = Cluster(app="examples/fastapi/channels.py", edges=1, workers=2, env=env)
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


def log_in(url: str, name: str) -> tuple[WebSession, PageData]:
    session = WebSession(url)
    form = session.get("/")
    assert form.status == 200 and 'name="username"' in form.body
    page = session.post("/login", {"username": name})
    assert page.status == 200 and page.url.rstrip("/") == url, (page.status, page.url)
    return session, PageData.parse(page.body)


def joined(js_client, page: PageData, name: str):
    client = js_client(name)
    answer = client.connect(page.app["socket-url"], authToken=page.app["token"])
    assert answer["status"] == "open", answer
    joined = client.join("notes", f"notifications:{page.app['user']}", on=["notification"])
    assert joined["status"] == "ok", joined
    return client


def notify_until_received(sender: WebSession, client, to: str) -> None:
    """Publish probes through the app until one arrives: the channel's new subscription has
    reached the app's publisher (a PUB socket sends only what is subscribed)."""
    n = itertools.count()

    def arrived() -> bool:
        answer = sender.post("/notify", {"to": to, "body": f"probe {next(n)}"})
        assert answer.status == 202, answer
        return bool(client.messages("notes", "notification"))

    wait_until(arrived, 10, interval=0.05, message="no probe notification arrived")


@pytest.mark.timeout(60)
def test_logged_in_user_joins_with_the_page_token_and_gets_what_the_app_publishes(system, js_client):
    cluster, url = system
    _, page = log_in(url, "alice")
    assert page.app["user"] == "alice"
    assert page.app["socket-url"] == cluster.ws_urls[0]
    phoenix_js = f"{cluster.http_urls[0]}/js/phoenix.js"
    assert phoenix_js in page.scripts                  # the page loads phoenix.js from the edge
    with urllib.request.urlopen(phoenix_js, timeout=10) as resp:
        assert resp.status == 200 and b"authToken" in resp.read()

    alice = joined(js_client, page, "alice")
    bob, _ = log_in(url, "bob")
    notify_until_received(bob, alice, "alice")
    body = f"your export is ready {uuid.uuid4().hex[:8]}"
    answer = bob.post("/notify", {"to": "alice", "body": body})
    assert (answer.status, json.loads(answer.body)) == (202, {"published": True})
    alice.wait_event({"type": "message", "chan": "notes", "event": "notification",
                      "payload": {"from": "bob", "body": body}}, timeout=10)


@pytest.mark.timeout(60)
def test_a_users_token_does_not_join_another_users_notifications(system, js_client):
    cluster, url = system
    _, page = log_in(url, "carol")
    client = js_client("carol")
    assert client.connect(page.app["socket-url"], authToken=page.app["token"])["status"] == "open"
    answer = client.join("notes", "notifications:alice")
    assert (answer["status"], answer["response"]) == ("error", {"reason": "unauthorized"})


def forged() -> str:
    return sign("not the app's secret_key_base, forged", SALT, "alice")


def tampered() -> str:
    """A real token for "mallory" with its data swapped for "alice" (signature kept)."""
    header, _, mac = sign(SECRET, SALT, "mallory").split(".")
    return f"{header}.{sign(SECRET, SALT, 'alice').split('.')[1]}.{mac}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, token, logged", [
    ("absent", None, "token missing"),
    ("forged", forged, "token invalid"),
    ("tampered", tampered, "token invalid"),
    ("wrong salt", lambda: sign(SECRET, "user auth", "alice"), "token invalid"),
])
def test_connect_refuses_a_forged_or_absent_token(system, js_client, kind, token, logged):
    cluster, _ = system
    before = len(cluster.supervisor.stderr_text())
    opts = {} if token is None else {"authToken": token()}
    assert_connect_refused(js_client(kind), cluster.ws_urls[0], **opts)
    wait_until(lambda: logged in cluster.supervisor.stderr_text()[before:], 5,
               message=lambda: cluster.supervisor.stderr_text()[before:][-2000:])


@pytest.mark.timeout(30)
def test_bad_logins_and_notifications_get_clear_errors(system):
    _, url = system
    anonymous = WebSession(url)
    refused = anonymous.post("/login", {"username": "no spaces allowed"})
    assert refused.status == 400 and "1 to 32 letters" in refused.body
    assert anonymous.post("/notify", {"to": "alice", "body": "hi"}).status == 401
    dave, _ = log_in(url, "dave")
    for fields, error in [({"to": "al ice", "body": "hi"}, "to must be a user name"),
                          ({"to": "alice", "body": ""}, "body must be 1 to 500 characters"),
                          ({"to": "alice", "body": "x" * 501}, "body must be 1 to 500 characters")]:
        answer = dave.post("/notify", fields)
        assert (answer.status, json.loads(answer.body)) == (400, {"error": error})
    logged_out = dave.post("/logout", {})
    assert logged_out.status == 200 and 'name="username"' in logged_out.body
    assert dave.post("/notify", {"to": "alice", "body": "hi"}).status == 401
