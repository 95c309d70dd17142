"""The channels the web-app examples' pages join (examples/fastapi, examples/django): each
logged-in user's own notifications.

The web app (``app.py``) logs a user in, signs a Phoenix.Token for them (salt
``"user socket"``, data: the user name) and puts it in the page; the page passes it to
phoenix.js as ``new Socket(url, {authToken: token})``.  ``connect`` below verifies it with the
same ``ZCHANNELS_SECRET_KEY_BASE`` and refuses the connection when it does not verify (forged,
expired, signed with another secret or salt) or is missing.  A verified user may join only
``notifications:<their name>``; the web app publishes to that topic from its request
handlers, so nothing here handles client pushes.

    export ZCHANNELS_SECRET_KEY_BASE=$(openssl rand -base64 48)   # the web app's too
    scripts/dev examples/notifications/channels.py
"""
import logging
import os

from zchannels import (JSON, Channel, HandlerResult, JoinResult, JSONObject, Payload, Socket,
                     SocketState, TokenError, error, ok, reply, verify_token)

log = logging.getLogger("notifications")

TOKEN_SALT = "user socket"        # app.py signs with the same salt
TOKEN_MAX_AGE = 14 * 86_400       # two weeks, as in the Phoenix guides
TOPIC_PREFIX = "notifications:"

SECRET_KEY_BASE = os.environ.get("ZCHANNELS_SECRET_KEY_BASE", "")
if len(SECRET_KEY_BASE.encode()) < 20:
    raise ValueError("set ZCHANNELS_SECRET_KEY_BASE (at least 20 bytes, the web app's secret too); "
                     "`openssl rand -base64 48` makes one")


class NotificationChannel(Channel):
    def join(self, topic: str, payload: JSON, socket: SocketState) -> JoinResult:
        if topic == TOPIC_PREFIX + socket.assigns["user"]:
            return ok()
        return error({"reason": "unauthorized"})

    def handle_in(self, event: str, payload: Payload, socket: SocketState) -> HandlerResult:
        # The page only listens; notifications come from the web app's publisher.
        return reply("error", {"reason": f"unknown event {event}"})


socket = Socket()
socket.channel(TOPIC_PREFIX + "*", NotificationChannel)


@socket.connect
def connect(params: JSONObject, socket: SocketState, connect_info: JSONObject) -> SocketState | bool:
    token = connect_info.get("auth_token")     # phoenix.js's authToken option
    peer = (connect_info.get("peer_data") or {}).get("address")
    try:
        user = verify_token(SECRET_KEY_BASE, TOKEN_SALT, token, max_age=TOKEN_MAX_AGE)
    except TokenError as exc:
        log.info("refused connection from %s: token %s", peer, exc.reason)
        return False
    if not isinstance(user, str) or not user:
        log.info("refused connection from %s: token data %.80r is not a user name", peer, user)
        return False
    return socket.assign(user=user)
