"""examples/guide/channels.py behaves as the Phoenix Channels guide's code does, seen on the wire
(raw WebSocket, V2): the lobby is open and private rooms are refused, ``new_msg`` is broadcast as
``{"body": ...}`` only, ``user_joined`` passes through ``handle_out``, an unknown event crashes
the channel (no catch-all), and ``connect`` takes anonymous visitors and verifies tokens.
"""
from __future__ import annotations

import uuid

import pytest

from tests.rawws import HandshakeRefused, RawWS
from zchannels.workers.token import sign
from zchannels import Publisher

pytestmark = pytest.mark.timeout(60)

SECRET = "the guide's secret_key_base, for tests only"
LOBBY = "room:lobby"


@pytest.fixture(scope="module")
def guide(module_cluster_factory):
    return module_cluster_factory(app="examples/guide/channels.py", edges=1, workers=1,
                                  env={"ZCHANNELS_SECRET_KEY_BASE": SECRET})


def join_lobby(ws: RawWS, join_ref: str = "1") -> None:
    ws.send_json([join_ref, join_ref, LOBBY, "phx_join", {}])
    assert ws.recv_json(5) == [join_ref, join_ref, LOBBY, "phx_reply", {"status": "ok", "response": {}}]


def crash_frames(ws: RawWS) -> list:
    """The frames of a crash, skipping broadcasts from other tests: up to the phx_error."""
    frames = []
    while not frames or frames[-1][3] != "phx_error":
        frames.append(ws.recv_until(lambda m: m[3] in ("phx_reply", "phx_error"), 5))
    return frames


def test_the_lobby_is_open_and_a_private_room_is_unauthorized(guide):
    with RawWS.connect(guide.raw_url(0)) as ws:
        join_lobby(ws)
        ws.send_json(["2", "2", "room:123", "phx_join", {}])
        assert ws.recv_json(5) == ["2", "2", "room:123", "phx_reply",
                                   {"status": "error", "response": {"reason": "unauthorized"}}]


def test_new_msg_is_broadcast_to_every_member_as_its_body_only(guide):
    body = f"hello {uuid.uuid4().hex[:8]}"
    with RawWS.connect(guide.raw_url(0)) as a, RawWS.connect(guide.raw_url(0)) as b:
        join_lobby(a)
        join_lobby(b)
        a.send_json(["1", "2", LOBBY, "new_msg", {"body": body, "user": "ignored by the guide"}])
        expected = [None, None, LOBBY, "new_msg", {"body": body}]   # the fastlane: no join_ref
        for ws in (a, b):
            assert ws.recv_until(lambda m: m[3] == "new_msg" and m[4]["body"] == body, 5) == expected


def test_an_unknown_event_crashes_the_channel_with_phx_error(guide):
    with RawWS.connect(guide.raw_url(0)) as ws:
        join_lobby(ws, "7")
        ws.send_json(["7", "8", LOBBY, "shout", {"body": "no clause for this"}])
        assert crash_frames(ws) == [
            # The push whose answer the crash lost hears of it (docs/architecture.md), then the
            # channel's phx_error, as in Phoenix.
            ["7", "8", LOBBY, "phx_reply", {"status": "error", "response": {"reason": "channel lost"}}],
            ["7", "7", LOBBY, "phx_error", {"reason": "channel_crash"}]]
        # A new_msg without a body matches no clause either.
        join_lobby(ws, "9")
        ws.send_json(["9", "10", LOBBY, "new_msg", {"text": "no body"}])
        assert crash_frames(ws)[-1] == ["9", "9", LOBBY, "phx_error", {"reason": "channel_crash"}]
        assert "RoomChannel has no handle_in for event 'shout'" in guide.supervisor.stderr_text()


def test_user_joined_is_intercepted_and_pushed_by_handle_out(guide):
    with RawWS.connect(guide.raw_url(0)) as ws:
        join_lobby(ws, "5")
        with Publisher(guide.bus) as pub:
            pub.wait_connected(5)
            pub.broadcast(LOBBY, "user_joined", {"user_id": 42})
            # Pushed by handle_out, so it carries this channel's join_ref (a fastlane frame has null).
            assert ws.recv_until(lambda m: m[3] == "user_joined", 5) == [
                "5", None, LOBBY, "user_joined", {"user_id": 42}]


@pytest.mark.parametrize("params", [{}, {"token": ""}], ids=["no token", "empty token"])
def test_a_visitor_without_a_token_connects_anonymously(guide, params):
    with RawWS.connect(guide.raw_url(0, **params)) as ws:
        join_lobby(ws)


def test_a_valid_token_connects_and_a_bad_or_expired_one_is_refused(guide):
    good = sign(SECRET, "user socket", 42)
    with RawWS.connect(guide.raw_url(0, token=good)) as ws:
        join_lobby(ws)
    bad = [sign("another secret_key_base, not the guide's", "user socket", 42),
           sign(SECRET, "another salt", 42),
           sign(SECRET, "user socket", 42, signed_at=1),       # signed in 1970: expired
           "not a token"]
    for token in bad:
        with pytest.raises(HandshakeRefused) as refused:
            RawWS.connect(guide.raw_url(0, token=token))
        assert refused.value.code == 403
