"""Test channel handlers in-process: Phoenix.ChannelTest for zchannels.

The handler module runs on a real worker (``workers.runner.Worker``: channel mailboxes,
intercepts, timers, presence) inside the test process, with no broker, edge or sockets; each
test takes milliseconds.  Calls are synchronous, for plain pytest (or unittest)::

    from pathlib import Path

    import pytest
    from zchannels.testing import JoinRefused, channel_app

    channels = channel_app(Path(__file__).parent / "channels.py")   # a pytest fixture

    def test_new_msg_is_broadcast(channels):
        sock = channels.connect({"user": "ann"}, connect_info={"peer_data": {"address": "127.0.0.1"}})
        chan = sock.subscribe_and_join("room:lobby", {})
        ref = chan.push("ping", {"n": 1})
        chan.assert_reply(ref, "ok", {"n": 1})
        chan.push("new_msg", {"body": "hi"})
        chan.assert_broadcast("new_msg", {"body": "hi", "user": "ann"})
        chan.assert_push("new_msg", {"body": "hi", "user": "ann"})

    def test_private_rooms_refuse(channels):
        with pytest.raises(JoinRefused) as refused:
            channels.connect({"user": "ann"}).subscribe_and_join("room:secret")
        assert refused.value.response == {"reason": "unauthorized"}

The pieces, as in Phoenix.ChannelTest:

* ``ChannelTest(app)`` (``channel_app(app)`` makes it a fixture): ``connect(params,
  connect_info)`` runs the app's ``connect`` and returns a ``ClientSocket`` or raises
  ``ConnectRefused``; ``socket(assigns, id)`` skips it; ``broadcast(topic, event, payload)``
  publishes from outside; ``assert_broadcast`` / ``refute_broadcast(topic, event, payload)``;
  ``advance(seconds)`` lets timers fire; ``presence_list(topic)``; ``close()``.
* ``ClientSocket``: ``subscribe_and_join(topic, payload)`` returns a ``ClientChannel`` or
  raises ``JoinRefused``; ``close()`` ends its channels as a lost connection does.
* ``ClientChannel``: ``push(event, payload)`` returns a ref for ``assert_reply(ref, status,
  response)`` / ``refute_reply``; ``assert_push`` / ``refute_push(event, payload)`` see what
  the client receives (pushes, and broadcasts on the topic through the fastlane or
  ``handle_out``); ``assert_broadcast`` / ``refute_broadcast`` on its topic; ``send(msg)``
  reaches ``handle_info``; ``broadcast_from``; ``leave()`` and ``close()`` return once
  ``terminate`` has run; ``assert_closed()`` / ``assert_crashed()``; ``state``, ``response``
  (the join's reply), ``assigns`` and ``channel`` (the app's Channel instance).

``channel_app`` needs no plugin: the fixture takes the name it is assigned to, in a test module
or a conftest.py.  Without pytest, use ``with ChannelTest(app) as channels: ...``.  The kit
runs its own event loop, so call it from plain (not ``async def``) tests.

Assertions wait up to ``timeout`` (0.1 s by default) and take the message they match out of
the mailbox, leaving the others; a failure lists what did arrive.  Expected payloads compare
with ``==``: ``ANY`` (``unittest.mock.ANY``) matches anything, inside dicts too.  Time is the
loop's: it jumps over idle time (``autojump``), so ``send_after``, presence's 50 ms diff
window and a refute's timeout cost no real time; ``advance(seconds)`` moves it on explicitly.
"""
from unittest.mock import ANY

from zchannels.testing.clients import ClientChannel, ClientSocket, ConnectRefused, JoinRefused
from zchannels.testing.fixtures import channel_app
from zchannels.testing.harness import DEFAULT_TIMEOUT, ChannelTest

__all__ = ["ANY", "ChannelTest", "ClientSocket", "ClientChannel", "ConnectRefused", "JoinRefused",
           "channel_app", "DEFAULT_TIMEOUT"]
