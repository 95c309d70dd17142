"""Phoenix.Token end to end: the chat example (examples/chat/channels.py) with
ZCHANNELS_SECRET_KEY_BASE set, real phoenix.js 1.8.17 clients, broker + edge + 2 workers.

The token travels in the connect params (`params: {token}`) or in phoenix.js's `authToken`
option (a Sec-WebSocket-Protocol entry, docs/protocol.md §2.3). A token that does not verify
refuses the connection: phoenix.js sees error + close and never opens.
"""
from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import wait_until
from zchannels.workers.token import sign

SECRET = "chat-e2e-" + "s3cret" * 6
SALT = "user socket"
CHAT_APP = "examples/chat/channels.py"


@pytest.fixture(scope="module")
def chat(module_cluster_factory):
    return module_cluster_factory(app=CHAT_APP, edges=1, workers=2,
                                  env={"ZCHANNELS_SECRET_KEY_BASE": SECRET})


def chat_says(js_client, url: str, name: str, params: dict, **opts) -> dict:
    """Connect, join room:lobby, send new_msg; return the new_msg broadcast as received."""
    c = js_client(name)
    answer = c.connect(url, params, **opts)
    assert answer["status"] == "open", answer
    assert c.join("lobby", "room:lobby", on=["new_msg"])["status"] == "ok"
    body = f"hello {uuid.uuid4().hex[:8]}"
    c.push("lobby", "new_msg", {"body": body}, nowait=True)
    ev = c.wait_event(lambda e: e.get("type") == "message" and e.get("event") == "new_msg"
                      and e["payload"].get("body") == body, timeout=10)
    return ev["payload"]


def test_token_in_params_joins_and_messages_carry_the_tokens_user(js_client, chat):
    token = sign(SECRET, SALT, "ada")
    # The name in params is ignored once tokens are required: the token says who it is.
    payload = chat_says(js_client, chat.ws_urls[0], "ada", {"token": token, "user": "mallory"})
    assert payload["user"] == "ada"


def test_auth_token_option_joins_and_messages_carry_the_tokens_user(js_client, chat):
    token = sign(SECRET, SALT, "grace")
    payload = chat_says(js_client, chat.ws_urls[0], "grace", {"user": "mallory"}, authToken=token)
    assert payload["user"] == "grace"


BAD_TOKENS = {   # kind -> (make the token, what the worker logs)
    "forged": (lambda: sign("another-secret-of-30-bytes....", SALT, "ada"), "token invalid"),
    "wrong salt": (lambda: sign(SECRET, "user auth", "ada"), "token invalid"),
    "expired": (lambda: sign(SECRET, SALT, "ada", signed_at=time.time() - 15 * 86_400), "token expired"),
    "tampered": (lambda: swap_payload(sign(SECRET, SALT, "ada"), sign(SECRET, SALT, "root")),
                 "token invalid"),
}


def swap_payload(token: str, other: str) -> str:
    """`token`'s header and signature around `other`'s payload."""
    header, _, mac = token.split(".")
    return f"{header}.{other.split('.')[1]}.{mac}"


def assert_never_opens(c, url: str, params: dict, **opts) -> None:
    # Fast reconnects: three refused attempts in a row prove the refusal is not a fluke.
    answer = c.connect(url, params, reconnectAfterMs=100, **opts)
    assert answer["status"] in ("error", "closed"), answer
    c.wait_event({"type": "socket_error"})
    closes = c.wait_events({"type": "socket_close"}, 3, timeout=10)
    assert all(close["code"] == 1006 for close in closes), closes
    assert c.find({"type": "socket_open"}) == []


@pytest.mark.parametrize("via", ["params", "authToken"])
@pytest.mark.parametrize("kind", list(BAD_TOKENS))
def test_bad_tokens_are_refused_and_logged(js_client, chat, kind, via):
    make, logged = BAD_TOKENS[kind]
    token = make()
    c = js_client(f"{kind}-{via}")
    before = len(chat.supervisor.stderr_text())
    if via == "params":
        assert_never_opens(c, chat.ws_urls[0], {"token": token, "user": "ada"})
    else:
        assert_never_opens(c, chat.ws_urls[0], {"user": "ada"}, authToken=token)
    wait_until(lambda: logged in chat.supervisor.stderr_text()[before:], 5,
               message=lambda: chat.supervisor.stderr_text()[before:][-2000:])


def test_missing_token_is_refused_when_a_secret_is_configured(js_client, chat):
    before = len(chat.supervisor.stderr_text())
    assert_never_opens(js_client("anon"), chat.ws_urls[0], {"user": "ada"})
    wait_until(lambda: "token missing" in chat.supervisor.stderr_text()[before:], 5)


def test_without_a_secret_the_example_accepts_users_by_name(js_client, cluster_factory):
    plain = cluster_factory(app=CHAT_APP, edges=1, workers=1,
                            env={"ZCHANNELS_SECRET_KEY_BASE": ""})
    payload = chat_says(js_client, plain.ws_urls[0], "ann", {"user": "ann"})
    assert payload["user"] == "ann"
