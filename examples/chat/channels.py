"""The chat example: the RoomChannel of the Phoenix channels guide, in Python.

Run it with ``zchannels dev examples/chat/channels.py`` and open http://127.0.0.1:4000.
``room:lobby`` is open to everyone; every other ``room:*`` topic is private.

Who is who: without configuration anyone connects under the name they give
(``params: {user: "ada"}``).  With ``ZCHANNELS_SECRET_KEY_BASE`` set (>= 20 bytes, the same
secret as the web app that logs users in), a connection needs a Phoenix.Token signed with
salt "user socket" whose data is the user name, in ``params: {token}`` or phoenix.js's
``authToken`` option; ``python examples/chat/mint_token.py NAME`` mints one.

Message recovery: every room keeps its last 1,000 broadcasts for 5 minutes (``history``), and
the page joins through /js/zchannels-recovery.js, so a tab that was offline shows every message
sent meanwhile (docs/recovery.md).
"""
import logging
import os
import time

from zchannels import (JSON, Channel, HandlerResult, History, JoinResult, JSONObject, OutPayload,
                       OutResult, Payload, Socket, SocketState, TokenError, error, noreply, ok,
                       reply, verify_token)

log = logging.getLogger("chat")

SECRET_KEY_BASE = os.environ.get("ZCHANNELS_SECRET_KEY_BASE") or None
TOKEN_SALT = "user socket"
TOKEN_MAX_AGE = 14 * 86_400   # two weeks, as in the Phoenix guides
if SECRET_KEY_BASE is not None and len(SECRET_KEY_BASE.encode()) < 20:
    raise ValueError("ZCHANNELS_SECRET_KEY_BASE must be at least 20 bytes "
                     f"(got {len(SECRET_KEY_BASE.encode())}); `openssl rand -base64 48` makes one")


class RoomChannel(Channel):
    # "user_joined" broadcasts go through handle_out, so each client can filter them.
    intercept = ["user_joined"]

    def join(self, topic: str, payload: JSON, socket: SocketState) -> JoinResult:
        if topic != "room:lobby":
            return error({"reason": "unauthorized"})
        params = payload if isinstance(payload, dict) else {}
        # Users this client does not want to hear about (join params {"ignore": [...]}).
        socket.assign(ignoring=frozenset(params.get("ignore") or ()))
        # The page asks to be announced and tracked in presence ({"announce": true}); the
        # presence benchmark only to be tracked ({"track": true}); the other load tests
        # neither (every announcement passes through handle_out of every member).
        # Pushing or broadcasting is not allowed inside join: both happen in handle_info.
        if params.get("announce"):
            self.send("after_join")
        elif params.get("track"):
            self.send("track")
        return ok()

    def handle_info(self, msg: object, socket: SocketState) -> OutResult:
        if msg == "after_join":
            self.broadcast("user_joined", {"user": socket.assigns["user"]})
        if msg in ("after_join", "track"):
            # Presence, as in the Phoenix guide: track this connection under the user name
            # (two tabs = two metas under one key), then hand the client the full state;
            # phoenix.js Presence applies the presence_diff broadcasts after it.
            self.track(socket.assigns["user"], {"online_at": int(time.time())})
            self.push("presence_state", self.presence_list())
        return noreply()

    def handle_in(self, event: str, payload: Payload, socket: SocketState) -> HandlerResult:
        if event == "new_msg":
            if not isinstance(payload, dict):   # a crash, like a new_msg without "body"
                raise TypeError(f"new_msg payload must be a JSON object, got {type(payload).__name__}")
            self.broadcast("new_msg", {"body": payload["body"], "user": socket.assigns["user"]})
            return noreply()
        if event == "ping":   # echo: the benchmarks measure push -> reply with it
            return reply("ok", payload)
        return reply("error", {"reason": f"unknown event {event}"})

    def handle_out(self, event: str, payload: OutPayload, socket: SocketState) -> OutResult:
        # A binary broadcast names no user: nothing to filter.
        if isinstance(payload, dict) and payload.get("user") in socket.assigns["ignoring"]:
            return noreply()   # filtered: this client never sees it
        self.push(event, payload)
        return noreply()


history = [History("room:*", keep=1000, seconds=300)]

socket = Socket()
socket.channel("room:*", RoomChannel)


@socket.connect
def connect(params: JSONObject, socket: SocketState, connect_info: JSONObject) -> SocketState | bool:
    if SECRET_KEY_BASE is None:
        return socket.assign(user=params.get("user") or "anonymous")
    token = params.get("token") or connect_info.get("auth_token")
    peer = (connect_info.get("peer_data") or {}).get("address")
    try:
        user = verify_token(SECRET_KEY_BASE, TOKEN_SALT, token, max_age=TOKEN_MAX_AGE)
    except TokenError as exc:
        log.info("refused connection from %s: token %s", peer, exc)
        return False
    if not isinstance(user, (str, int)) or isinstance(user, bool):
        log.info("refused connection from %s: token data %.80r is not a user name", peer, user)
        return False
    return socket.assign(user=str(user))
