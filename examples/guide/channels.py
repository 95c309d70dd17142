"""The Phoenix Channels guide's chat, ported line for line: its UserSocket and its RoomChannel.

Run it with ``zchannels dev examples/guide/channels.py`` and open http://127.0.0.1:4000 in two
tabs (the page is ``static/index.html``, the guide's own markup and JavaScript).  The README
section "From the guide to zchannels" sets each Elixir snippet of the guide beside its Python.

- ``UserSocket`` (``lib/hello_web/channels/user_socket.ex``): ``channel "room:*", RoomChannel``;
  ``connect`` accepts anonymous visitors, as the generated socket does, and verifies a
  Phoenix.Token (salt ``"user socket"``, max age two weeks) when the page gives one, as step 3
  of the guide's token authentication does.  Tokens need ``ZCHANNELS_SECRET_KEY_BASE`` (the web
  app's ``secret_key_base``; ``python examples/guide/user_token.py USER_ID`` mints one).
- ``RoomChannel`` (``lib/hello_web/channels/room_channel.ex``): ``room:lobby`` is open, every
  other room is private; ``new_msg`` is broadcast as ``{"body": body}``; ``user_joined`` is
  intercepted and filtered in ``handle_out``.  As in the guide there is no catch-all clause:
  any other event crashes the channel, the client gets ``phx_error`` and phoenix.js rejoins.
  A clause that falls through to ``super()`` returns ``Channel``'s own declared type, which
  allows ``async def`` overrides: ``MaybeAwaitable[...]``.
"""
import logging
import os

from zchannels import (JSON, Channel, HandlerResult, JoinResult, JSONObject, MaybeAwaitable,
                     OutPayload, OutResult, Payload, Socket, SocketState, TokenError, error,
                     noreply, ok, verify_token)

log = logging.getLogger("guide")

SECRET_KEY_BASE = os.environ.get("ZCHANNELS_SECRET_KEY_BASE") or None
TOKEN_SALT = "user socket"


class User:
    """The guide's stand-in ``User`` model: ``User.ignoring?(user, user_id)``."""

    @staticmethod
    def ignoring(user: object, user_id: object) -> bool:
        return isinstance(user, dict) and user_id in user.get("ignoring", ())


# --- lib/hello_web/channels/room_channel.ex ---------------------------------------------

class RoomChannel(Channel):
    intercept = ["user_joined"]

    def join(self, topic: str, message: JSON, socket: SocketState) -> MaybeAwaitable[JoinResult]:
        match topic:
            case "room:lobby":
                return ok()
            case _ if topic.startswith("room:"):     # "room:" <> _private_room_id
                return error({"reason": "unauthorized"})
        return super().join(topic, message, socket)  # no clause matched: a crash

    def handle_in(self, event: str, payload: Payload,
                  socket: SocketState) -> MaybeAwaitable[HandlerResult]:
        match event, payload:
            case "new_msg", {"body": body}:
                self.broadcast("new_msg", {"body": body})
                return noreply()
        # No clause matched, like Elixir's FunctionClauseError: the channel crashes.
        return super().handle_in(event, payload, socket)

    def handle_out(self, event: str, payload: OutPayload,
                   socket: SocketState) -> MaybeAwaitable[OutResult]:
        match event:
            case "new_msg":       # called only for intercepted events, as in Phoenix
                self.push("new_msg", payload)
                return noreply()
            case "user_joined" if isinstance(payload, dict):   # a binary one is pushed as is
                if User.ignoring(socket.assigns.get("user"), payload.get("user_id")):
                    return noreply()
                self.push("user_joined", payload)
                # The guide returns push's :ok here, which Phoenix refuses as a bad return.
                return noreply()
        return super().handle_out(event, payload, socket)


# --- lib/hello_web/channels/user_socket.ex ----------------------------------------------

socket = Socket()
socket.channel("room:*", RoomChannel)


@socket.connect
def connect(params: JSONObject, socket: SocketState, connect_info: JSONObject) -> SocketState | bool:
    match params:
        # The layout renders window.userToken as "" for a visitor who is not logged in.
        case {"token": str(token)} if token:
            if SECRET_KEY_BASE is None:
                log.info("refused a token: ZCHANNELS_SECRET_KEY_BASE is not set, nothing verifies it")
                return False
            try:
                # max_age: 1209600 is equivalent to two weeks in seconds
                user_id = verify_token(SECRET_KEY_BASE, TOKEN_SALT, token, max_age=1209600)
            except TokenError as exc:
                log.info("refused a token: %s", exc.reason)
                return False                            # :error
            return socket.assign(current_user=user_id)
        case _:
            return socket                               # {:ok, socket}: anonymous


@socket.id
def socket_id(socket: SocketState) -> str | None:
    return None                                         # def id(_socket), do: nil
