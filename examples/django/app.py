"""A one-file Django project in front of zchannels: log in, get a channel token, publish.

    export ZCHANNELS_SECRET_KEY_BASE=$(openssl rand -base64 48)   # shared with the workers
    scripts/dev examples/notifications/channels.py                  # broker, edge :4000, workers
    .venv/bin/python examples/django/app.py runserver 8000

then open http://127.0.0.1:8000 in two browsers (or a normal and a private window).  Any WSGI
server runs it too: ``examples.django.app:application`` from the repository root.

- ``POST /login`` takes a user name and keeps it in Django's signed-cookie session: no
  database.  It stands in for ``django.contrib.auth``'s login; with it, sign
  ``request.user.pk`` (or the user name) instead, exactly the same way.
- ``GET /`` signs a Phoenix.Token for the logged-in user (``workers.token.sign``, salt
  ``"user socket"``) and renders a page that loads phoenix.js from the edge and joins
  ``notifications:<user>`` with ``new Socket(url, {authToken: token})``; ``channels.py``
  verifies the token in ``connect``.
- ``POST /notify`` (``to``, ``body``, CSRF-protected like every POST) publishes a
  ``notification`` broadcast to ``notifications:<to>`` with the synchronous ``Publisher``:
  one per process, made on the first notification (so after a pre-forking server's fork).

Environment: ``ZCHANNELS_SECRET_KEY_BASE`` (required, >= 20 bytes, the same as the workers'),
``ZCHANNELS_BUS`` (default ``tcp://127.0.0.1:5570``), ``ZCHANNELS_EDGE_URL`` (where the browser
reaches an edge, default ``http://127.0.0.1:4000``), ``DJANGO_SECRET_KEY`` (signs sessions and
CSRF tokens; default: random at start, so a restart logs everyone out).
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import secrets
import sys
import threading
from pathlib import Path

import django
from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import path
from django.views.decorators.http import require_GET, require_POST

from zchannels.workers.token import sign
from zchannels import Publisher, PublishError
from zchannels.publisher import DEFAULT_BUS

log = logging.getLogger("django_example")

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

settings.configure(
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50),
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "[::1]"],
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
    ],
    SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies",
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates",
                "DIRS": [Path(__file__).resolve().parent / "templates"]}],
)
django.setup()


# --- the publisher ------------------------------------------------------------------------

_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


def publisher() -> Publisher:
    """This process's Publisher (thread-safe), made on first use."""
    global _publisher
    with _publisher_lock:
        if _publisher is None:
            pub = Publisher(BUS)
            # A new publisher drops what it sends until the broker has told it the subscriptions.
            if not pub.wait_connected(5):
                log.warning("%s; notifications fail until it is reachable", pub.unreachable_message())
            atexit.register(pub.close)   # flushes what is still queued
            _publisher = pub
        return _publisher


# --- views --------------------------------------------------------------------------------

@require_GET
def index(request: HttpRequest) -> HttpResponse:
    user = request.session.get("user")
    if user is None:
        return render(request, "login.html")
    token = sign(SECRET_KEY_BASE, TOKEN_SALT, user, max_age=TOKEN_MAX_AGE)
    return render(request, "page.html", {
        "user": user, "token": token, "edge_url": EDGE_URL, "socket_url": SOCKET_URL})


@require_POST
def login(request: HttpRequest) -> HttpResponse:
    username = request.POST.get("username", "").strip()
    if not USER_NAME.fullmatch(username):
        error = "A user name is 1 to 32 letters, digits, '.', '_' or '-'."
        return render(request, "login.html", {"error": error}, status=400)
    request.session.cycle_key()   # a new session on login, as django.contrib.auth.login does
    request.session["user"] = username
    return redirect("/")


@require_POST
def logout(request: HttpRequest) -> HttpResponse:
    request.session.flush()
    return redirect("/")


@require_POST
def notify(request: HttpRequest) -> HttpResponse:
    user = request.session.get("user")
    if user is None:
        return JsonResponse({"error": "log in first"}, status=401)
    to, body = request.POST.get("to", ""), request.POST.get("body", "")
    if not USER_NAME.fullmatch(to):
        return JsonResponse({"error": "to must be a user name"}, status=400)
    if not body or len(body) > MAX_BODY:
        return JsonResponse({"error": f"body must be 1 to {MAX_BODY} characters"}, status=400)
    try:
        sent = publisher().broadcast(TOPIC_PREFIX + to, "notification", {"from": user, "body": body})
    except PublishError as exc:
        log.warning("notification from %s to %s not published: %s", user, to, exc)
        return JsonResponse({"error": f"not published: {exc}"}, status=503)
    if not sent:
        return JsonResponse({"error": "the zchannels bus is unreachable right now; "
                                      "the notification is most likely lost"}, status=503)
    return JsonResponse({"published": True}, status=202)


urlpatterns = [
    path("", index),
    path("login", login),
    path("logout", logout),
    path("notify", notify),
]

application = get_wsgi_application()

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
