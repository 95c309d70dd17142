"""The Phoenix guide's chat (examples/guide/channels.py), tested with zchannels.testing as the
guide tests its RoomChannel with Phoenix.ChannelTest."""
from __future__ import annotations

from pathlib import Path

import pytest

from zchannels import sign_token
from zchannels.testing import ChannelTest, ConnectRefused, JoinRefused, channel_app

pytestmark = pytest.mark.timeout(10)

GUIDE = Path(__file__).resolve().parent.parent / "examples" / "guide" / "channels.py"
SECRET = "a test secret_key_base, long enough"

guide = channel_app(GUIDE)


@pytest.fixture(autouse=True)
def no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZCHANNELS_SECRET_KEY_BASE", raising=False)


def test_visitors_connect_anonymously_and_tokens_need_the_secret(guide: ChannelTest) -> None:
    assert guide.connect({}).assigns == {}
    assert guide.connect({"token": ""}).assigns == {}   # window.userToken of a visitor
    with pytest.raises(ConnectRefused):
        guide.connect({"token": sign_token(SECRET, "user socket", 7)})


def test_a_valid_token_assigns_the_current_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZCHANNELS_SECRET_KEY_BASE", SECRET)
    with ChannelTest(GUIDE) as secured:
        assert secured.connect({"token": sign_token(SECRET, "user socket", 7)}).assigns == {"current_user": 7}
        with pytest.raises(ConnectRefused):
            secured.connect({"token": sign_token(SECRET, "user socket", 7) + "x"})


def test_the_lobby_is_open_and_private_rooms_refused(guide: ChannelTest) -> None:
    sock = guide.connect({})
    assert sock.subscribe_and_join("room:lobby").state == "joined"
    with pytest.raises(JoinRefused) as private:
        sock.subscribe_and_join("room:42")
    assert private.value.response == {"reason": "unauthorized"}


def test_new_msg_broadcasts_its_body(guide: ChannelTest) -> None:
    lobby = guide.connect({}).subscribe_and_join("room:lobby")
    lobby.push("new_msg", {"body": "hello"})
    lobby.assert_broadcast("new_msg", {"body": "hello"})
    lobby.assert_push("new_msg", {"body": "hello"})


def test_an_event_without_a_clause_crashes_the_channel(guide: ChannelTest) -> None:
    lobby = guide.connect({}).subscribe_and_join("room:lobby")
    lobby.push("new_msg", {"text": "no body"})
    assert "no handle_in for event 'new_msg'" in (lobby.assert_crashed() or "")


def test_user_joined_is_filtered_for_users_who_ignore_the_joiner(guide: ChannelTest) -> None:
    ignoring = guide.socket({"user": {"ignoring": [5]}}).subscribe_and_join("room:lobby")
    other = guide.socket({"user": {"ignoring": []}}).subscribe_and_join("room:lobby")
    guide.broadcast("room:lobby", "user_joined", {"user_id": 5})
    other.assert_push("user_joined", {"user_id": 5})
    ignoring.refute_push("user_joined")
