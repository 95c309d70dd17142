"""The chat example's handlers (examples/chat/channels.py), tested with zchannels.testing:
connect and its tokens, the lobby and the private rooms, new_msg, the user_joined intercept
and its ignore list, and presence.  In-process, no broker or edge: the module runs in well
under a second."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from zchannels import AppLoadError, sign_token
from zchannels.testing import ANY, ChannelTest, ConnectRefused, JoinRefused, channel_app

pytestmark = pytest.mark.timeout(10)

CHAT = Path(__file__).resolve().parent.parent / "examples" / "chat" / "channels.py"
SECRET = "a test secret_key_base, long enough"

channels = channel_app(CHAT)


@pytest.fixture(autouse=True)
def no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chat reads ZCHANNELS_SECRET_KEY_BASE when it is loaded: none, unless a test sets it."""
    monkeypatch.delenv("ZCHANNELS_SECRET_KEY_BASE", raising=False)


@pytest.fixture
def secured(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChannelTest]:
    monkeypatch.setenv("ZCHANNELS_SECRET_KEY_BASE", SECRET)
    with ChannelTest(CHAT) as chat:
        yield chat


def one_meta() -> dict[str, list[dict[str, object]]]:
    return {"metas": [{"online_at": ANY, "phx_ref": ANY}]}


# --- connect ---------------------------------------------------------------------------

def test_connect_takes_the_user_name_from_the_params(channels: ChannelTest) -> None:
    assert channels.connect({"user": "ann"}).assigns == {"user": "ann"}
    assert channels.connect({}).assigns == {"user": "anonymous"}


def test_with_a_secret_connect_needs_a_token_naming_the_user(secured: ChannelTest) -> None:
    token = sign_token(SECRET, "user socket", "ann")
    assert secured.connect({"token": token}).assigns == {"user": "ann"}
    # phoenix.js's authToken option arrives in connect_info
    assert secured.connect({}, connect_info={"auth_token": token}).assigns == {"user": "ann"}
    # the name in the params no longer counts
    assert secured.connect({"token": token, "user": "mallory"}).assigns == {"user": "ann"}


@pytest.mark.parametrize("params", [
    {}, {"user": "ann"}, {"token": "not a token"},
    {"token": sign_token("another secret_key_base, long enough", "user socket", "ann")},
    {"token": sign_token(SECRET, "another salt", "ann")},
    {"token": sign_token(SECRET, "user socket", {"not": "a name"})},
], ids=["nothing", "a name", "garbage", "other secret", "other salt", "not a name"])
def test_with_a_secret_connect_refuses_anything_but_a_valid_token(secured: ChannelTest, params: dict[str, object]) -> None:
    with pytest.raises(ConnectRefused):
        secured.connect(params, connect_info={"peer_data": {"address": "127.0.0.1"}})


def test_a_secret_shorter_than_20_bytes_stops_the_app_from_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZCHANNELS_SECRET_KEY_BASE", "too short")
    with pytest.raises(AppLoadError, match="at least 20 bytes"):
        ChannelTest(CHAT)


# --- joins -----------------------------------------------------------------------------

def test_the_lobby_is_open_and_every_other_room_private(channels: ChannelTest) -> None:
    ann = channels.connect({"user": "ann"})
    lobby = ann.subscribe_and_join("room:lobby")
    assert lobby.state == "joined" and lobby.response == {}
    with pytest.raises(JoinRefused) as refused:
        ann.subscribe_and_join("room:secret")
    assert refused.value.response == {"reason": "unauthorized"}
    with pytest.raises(JoinRefused) as unmatched:
        ann.subscribe_and_join("lobby")
    assert unmatched.value.response == {"reason": "unmatched topic"}


def test_the_join_params_set_the_channels_ignore_list(channels: ChannelTest) -> None:
    lobby = channels.connect({"user": "ann"}).subscribe_and_join("room:lobby", {"ignore": ["bob"]})
    assert lobby.assigns == {"user": "ann", "ignoring": frozenset({"bob"})}


# --- messages --------------------------------------------------------------------------

def test_new_msg_is_broadcast_with_the_senders_name_to_everyone_in_the_room(channels: ChannelTest) -> None:
    ann = channels.connect({"user": "ann"}).subscribe_and_join("room:lobby")
    bob = channels.connect({"user": "bob"}).subscribe_and_join("room:lobby")
    ref = ann.push("new_msg", {"body": "hi"})
    ann.assert_broadcast("new_msg", {"body": "hi", "user": "ann"})
    ann.assert_push("new_msg", {"body": "hi", "user": "ann"})
    bob.assert_push("new_msg", {"body": "hi", "user": "ann"})
    ann.refute_reply(ref)   # noreply


def test_ping_is_answered_with_its_payload_and_unknown_events_with_an_error(channels: ChannelTest) -> None:
    lobby = channels.connect({"user": "ann"}).subscribe_and_join("room:lobby")
    lobby.assert_reply(lobby.push("ping", {"n": 1}), "ok", {"n": 1})
    lobby.assert_reply(lobby.push("shout", {}), "error", {"reason": "unknown event shout"})
    assert lobby.state == "joined"


def test_a_new_msg_that_is_not_an_object_crashes_the_channel(channels: ChannelTest) -> None:
    lobby = channels.connect({"user": "ann"}).subscribe_and_join("room:lobby")
    lobby.push("new_msg", ["hi"])
    crash = lobby.assert_crashed()
    assert crash is not None and "new_msg payload must be a JSON object" in crash
    lobby.socket.subscribe_and_join("room:lobby")   # phoenix.js rejoins: it works again


# --- user_joined: intercepted, filtered per client ------------------------------------

def test_an_announced_join_reaches_everyone_but_those_ignoring_the_user(channels: ChannelTest) -> None:
    ann = channels.connect({"user": "ann"}).subscribe_and_join("room:lobby")
    cy = channels.connect({"user": "cy"}).subscribe_and_join("room:lobby", {"ignore": ["bob"]})
    bob = channels.connect({"user": "bob"}).subscribe_and_join("room:lobby", {"announce": True})
    channels.assert_broadcast("room:lobby", "user_joined", {"user": "bob"})
    ann.assert_push("user_joined", {"user": "bob"})
    bob.assert_push("user_joined", {"user": "bob"})
    cy.refute_push("user_joined")


def test_only_an_announce_broadcasts_user_joined(channels: ChannelTest) -> None:
    ann = channels.connect({"user": "ann"}).subscribe_and_join("room:lobby")
    channels.connect({"user": "bob"}).subscribe_and_join("room:lobby", {"track": True})
    channels.connect({"user": "cy"}).subscribe_and_join("room:lobby")
    ann.refute_broadcast("user_joined")
    ann.refute_push("user_joined")


# --- presence --------------------------------------------------------------------------

def test_an_announced_join_gets_the_presence_state_and_the_room_a_diff(channels: ChannelTest) -> None:
    ann = channels.connect({"user": "ann"}).subscribe_and_join("room:lobby", {"announce": True})
    assert ann.assert_push("presence_state") == {"ann": one_meta()}
    ann.assert_push("presence_diff", {"joins": {"ann": one_meta()}, "leaves": {}})
    bob = channels.connect({"user": "bob"}).subscribe_and_join("room:lobby", {"track": True})
    assert bob.assert_push("presence_state") == {"ann": one_meta(), "bob": one_meta()}
    ann.assert_push("presence_diff", {"joins": {"bob": one_meta()}, "leaves": {}})
    assert set(channels.presence_list("room:lobby")) == {"ann", "bob"}


def test_two_tabs_of_one_user_are_two_metas_under_one_key(channels: ChannelTest) -> None:
    channels.connect({"user": "ann"}).subscribe_and_join("room:lobby", {"track": True})
    second = channels.connect({"user": "ann"}).subscribe_and_join("room:lobby", {"track": True})
    state = second.assert_push("presence_state")
    assert list(state) == ["ann"] and len(state["ann"]["metas"]) == 2


def test_leaving_or_closing_the_connection_ends_the_users_presence(channels: ChannelTest) -> None:
    ann = channels.connect({"user": "ann"}).subscribe_and_join("room:lobby", {"track": True})
    bob_socket = channels.connect({"user": "bob"})
    bob_socket.subscribe_and_join("room:lobby", {"track": True})
    cy = channels.connect({"user": "cy"}).subscribe_and_join("room:lobby", {"track": True})
    channels.advance(0.1)   # the join diffs go out
    cy.assert_reply(cy.leave(), "ok")
    assert cy.state == "closed"
    ann.assert_push("presence_diff", {"joins": {}, "leaves": {"cy": one_meta()}})
    bob_socket.close()
    ann.assert_push("presence_diff", {"joins": {}, "leaves": {"bob": one_meta()}})
    assert list(channels.presence_list("room:lobby")) == ["ann"]
