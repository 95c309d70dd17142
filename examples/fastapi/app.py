"""A FastAPI app in front of zchannels: log in, get a channel token, publish notifications.

    export ZCHANNELS_SECRET_KEY_BASE=$(openssl rand -base64 48)   # shared with the workers
    scripts/dev examples/notifications/channels.py                  # broker, edge :4000, workers
    .venv/bin/uvicorn examples.fastapi.app:app --port 8000          # from the repository root

then open http://127.0.0.1:8000 in two browsers (or a normal and a private window).

- ``POST /login`` takes a user name and keeps it in a signed session cookie (Starlette's
  ``SessionMiddleware``).  It stands in for your real login; what matters is what follows.
- ``GET /`` signs a Phoenix.Token for the logged-in user (``workers.token.sign``, salt
  ``"user socket"``) and renders a page that loads phoenix.js from the edge and joins
  ``notifications:<user>`` with ``new Socket(url, {authToken: token})``; ``channels.py``
  verifies the token in ``connect``.
- ``POST /notify`` (``to``, ``body``) publishes a ``notification`` broadcast to
  ``notifications:<to>`` with an ``AsyncPublisher`` made once, at startup, inside the loop.

Environment: ``ZCHANNELS_SECRET_KEY_BASE`` (required, >= 20 bytes, the same as the workers'),
``ZCHANNELS_BUS`` (default ``tcp://127.0.0.1:5570``), ``ZCHANNELS_EDGE_URL`` (where the browser
reaches an edge, default ``http://127.0.0.1:4000``), ``SESSION_SECRET_KEY`` (signs the session
cookie; default: random at start, so a restart logs everyone out).
"""
from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from zchannels.workers.token import sign
from zchannels import AsyncPublisher, PublishError
from zchannels.publisher import DEFAULT_BUS

log = logging.getLogger("fastapi_example")

TOKEN_SALT = "user socket"        # channels.py verifies with this salt ...
TOKEN_MAX_AGE = 14 * 86_400       # ... and this maximum age
TOPIC_PREFIX = "notifications:"   # ... and lets a user join only TOPIC_PREFIX + their name
USER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
MAX_BODY = 500                    # characters of a notification


def _secret_key_base() -> str:
    secret = os.environ.get("ZCHANNELS_SECRET_KEY_BASE", "")
    if len(secret.encode()) < 20:
        raise RuntimeError("set ZCHANNELS_SECRET_KEY_BASE (at least 20 bytes) to the secret the "
                           "zchannels workers verify tokens with; `openssl rand -base64 48` makes one")
    return secret


def socket_url(edge_url: str) -> str:
    """The phoenix.js endpoint on the edge at ``edge_url``: http://h:4000 -> ws://h:4000/socket."""
    scheme, sep, rest = edge_url.rstrip("/").partition("://")
    ws_scheme = {"http": "ws", "https": "wss"}.get(scheme)
    if not sep or ws_scheme is None or not rest:
        raise RuntimeError(f"ZCHANNELS_EDGE_URL must be an http:// or https:// URL, got {edge_url!r}")
    return f"{ws_scheme}://{rest}/socket"


SECRET_KEY_BASE = _secret_key_base()
BUS = os.environ.get("ZCHANNELS_BUS", DEFAULT_BUS)
EDGE_URL = os.environ.get("ZCHANNELS_EDGE_URL", "http://127.0.0.1:4000").rstrip("/")
SOCKET_URL = socket_url(EDGE_URL)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # One publisher for the process, made inside the running loop (and so after any fork).
    publisher = AsyncPublisher(BUS)
    # A new publisher drops what it sends until the broker has told it the subscriptions.
    if not await publisher.wait_connected(5):
        log.warning("%s; notifications fail until it is reachable", publisher.unreachable_message())
    app.state.publisher = publisher
    try:
        yield
    finally:
        await publisher.close()


app = FastAPI(lifespan=lifespan)
app.add_middleware(SessionMiddleware,
                   secret_key=os.environ.get("SESSION_SECRET_KEY") or secrets.token_urlsafe(32))


@app.get("/")
async def index(request: Request) -> Response:
    user = request.session.get("user")
    if user is None:
        return templates.TemplateResponse(request, "login.html", {"error": None})
    token = sign(SECRET_KEY_BASE, TOKEN_SALT, user, max_age=TOKEN_MAX_AGE)
    return templates.TemplateResponse(request, "page.html", {
        "user": user, "token": token, "edge_url": EDGE_URL, "socket_url": SOCKET_URL})


@app.post("/login")
async def login(request: Request, username: Annotated[str, Form()] = "") -> Response:
    username = username.strip()
    if not USER_NAME.fullmatch(username):
        error = "A user name is 1 to 32 letters, digits, '.', '_' or '-'."
        return templates.TemplateResponse(request, "login.html", {"error": error}, status_code=400)
    request.session["user"] = username
    return RedirectResponse("/", status_code=303)


@app.post("/logout")
async def logout(request: Request) -> RedirectResponse:
    request.session.clear()
    return RedirectResponse("/", status_code=303)


@app.post("/notify")
async def notify(request: Request, to: Annotated[str, Form()] = "",
                 body: Annotated[str, Form()] = "") -> JSONResponse:
    user = request.session.get("user")
    if user is None:
        return JSONResponse({"error": "log in first"}, status_code=401)
    if not USER_NAME.fullmatch(to):
        return JSONResponse({"error": "to must be a user name"}, status_code=400)
    if not body or len(body) > MAX_BODY:
        return JSONResponse({"error": f"body must be 1 to {MAX_BODY} characters"}, status_code=400)
    publisher: AsyncPublisher = request.app.state.publisher
    try:
        sent = await publisher.broadcast(TOPIC_PREFIX + to, "notification", {"from": user, "body": body})
    except PublishError as exc:
        log.warning("notification from %s to %s not published: %s", user, to, exc)
        return JSONResponse({"error": f"not published: {exc}"}, status_code=503)
    if not sent:
        return JSONResponse({"error": "the zchannels bus is unreachable right now; "
                                      "the notification is most likely lost"}, status_code=503)
    return JSONResponse({"published": True}, status_code=202)
