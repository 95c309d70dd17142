"""Helpers for the web-app example tests (tests/test_example_fastapi.py, test_example_django.py).

- `start_web_app` runs a web server (uvicorn, Django's runserver) as a `Proc` on a free loopback
  port and returns its base URL, read back from the server's own start-up line.
- `WebSession` is one browser's cookie jar over real HTTP: GET pages, POST forms.
- `PageData` is what a test needs from a rendered page: the `data-*` attributes of `#app`
  (user, token, socket URL), the script sources and the CSRF inputs.
- `log_in`, `join_notifications`, `notify_until_received` and `bad_tokens` are the steps both
  examples share: the same pages, the same `notifications:<user>` channel, the same token.
- `assert_connect_refused` proves that phoenix.js never gets a connection open.
- `run_pages_in_chromium` drives the example's own page in two headless Chromium browsers
  (tests/js/browser_webapp.js).
"""
from __future__ import annotations

import http.cookiejar
import itertools
import json
import os
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser

from tests.conftest import ROOT, Proc, wait_until
from zchannels.workers.token import sign

HTTP_TIMEOUT = 10.0
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
SALT = "user socket"
CSRF_FIELD = "csrfmiddlewaretoken"   # Django's; a page without it posts without it


def start_web_app(module: str, *args: str, env: dict[str, str], started: str,
                  stream: str = "stdout", timeout: float = 15.0) -> tuple[Proc, str]:
    """`python -m module *args`; wait until `stream` shows a line matching the regex `started`,
    whose group "url" is the server's base URL (the port it bound to 0)."""
    proc = Proc(module, *args, name=module.split(".")[-1], env=env)
    pattern = re.compile(started)

    def url():
        text = "\n".join(proc.lines) if stream == "stdout" else proc.stderr_text()
        found = pattern.search(text)
        return found and found.group("url").rstrip("/")

    try:
        # Proc.wait_for re-checks every 0.1 s, so a predicate reading stderr works too.
        return proc, proc.wait_for(url, timeout, f"a line matching {started!r} on {stream}")
    except BaseException:
        proc.stop()
        raise


@dataclass
class Response:
    status: int
    body: str
    url: str


class WebSession:
    """One browser: a cookie jar and real HTTP requests to the web app at `base_url`.

    Redirects are followed (a login's 303 lands on the page), 4xx/5xx answers are returned."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.cookies = http.cookiejar.CookieJar()
        self._opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def get(self, path: str) -> Response:
        return self._send(urllib.request.Request(self.base_url + path))

    def post(self, path: str, fields: dict[str, str], headers: dict[str, str] | None = None) -> Response:
        data = urllib.parse.urlencode(fields).encode()
        return self._send(urllib.request.Request(self.base_url + path, data=data, method="POST",
                                                 headers=headers or {}))

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.cookies if c.name == name), None)

    def _send(self, req: urllib.request.Request) -> Response:
        try:
            with self._opener.open(req, timeout=HTTP_TIMEOUT) as resp:
                return Response(resp.status, resp.read().decode(), resp.url)
        except urllib.error.HTTPError as exc:
            return Response(exc.code, exc.read().decode(), exc.url)


@dataclass
class PageData:
    app: dict[str, str] = field(default_factory=dict)       # data-* of #app, without "data-"
    scripts: list[str] = field(default_factory=list)        # <script src>
    inputs: dict[str, str] = field(default_factory=dict)    # <input name> -> value (last wins)

    @classmethod
    def parse(cls, html: str) -> "PageData":
        parser = _PageParser()
        parser.feed(html)
        return parser.data


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.data = PageData()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if attr.get("id") == "app":
            self.data.app = {k[5:]: v for k, v in attr.items() if k.startswith("data-")}
        if tag == "script" and "src" in attr:
            self.data.scripts.append(attr["src"])
        if tag == "input" and "name" in attr:
            self.data.inputs[attr["name"]] = attr.get("value", "")


def assert_connect_refused(client, url: str, **opts) -> None:
    """phoenix.js connects, is refused, retries fast and is refused again: never an open socket."""
    answer = client.connect(url, {}, reconnectAfterMs=100, **opts)
    assert answer["status"] in ("error", "closed"), answer
    closes = client.wait_events({"type": "socket_close"}, 3, timeout=10)
    assert all(close["code"] == 1006 for close in closes), closes   # refused at the upgrade
    assert client.find({"type": "socket_open"}) == []


# ---- the steps both examples share ----------------------------------------------------------

@dataclass
class LoggedIn:
    session: WebSession
    page: PageData

    def notify(self, to: str, body: str) -> Response:
        """Submit the page's notify form (with its CSRF field, if it has one)."""
        fields = {"to": to, "body": body}
        if CSRF_FIELD in self.page.inputs:
            fields[CSRF_FIELD] = self.page.inputs[CSRF_FIELD]
        return self.session.post("/notify", fields)


def login_form(session: WebSession) -> dict[str, str]:
    """GET / without a session: the login form; returns its hidden fields (CSRF)."""
    form = session.get("/")
    assert form.status == 200 and 'name="username"' in form.body, (form.status, form.body[:500])
    inputs = PageData.parse(form.body).inputs
    return {CSRF_FIELD: inputs[CSRF_FIELD]} if CSRF_FIELD in inputs else {}


def log_in(url: str, name: str) -> LoggedIn:
    """Log in as `name` through the login form; the redirect lands on the page with the token."""
    session = WebSession(url)
    page = session.post("/login", {"username": name, **login_form(session)})
    assert page.status == 200 and page.url.rstrip("/") == url, (page.status, page.url, page.body[:500])
    return LoggedIn(session, PageData.parse(page.body))


def join_notifications(js_client, page: PageData, name: str):
    """phoenix.js as the page does it: `new Socket(socketUrl, {authToken: token})`, then join
    `notifications:<user>` (channel object "notes") listening for "notification"."""
    client = js_client(name)
    answer = client.connect(page.app["socket-url"], authToken=page.app["token"])
    assert answer["status"] == "open", answer
    joined = client.join("notes", f"notifications:{page.app['user']}", on=["notification"])
    assert joined["status"] == "ok", joined
    return client


def notify_until_received(sender: LoggedIn, client, to: str) -> None:
    """Publish probes through the app until one arrives: the channel's new subscription has
    reached the app's publisher (a PUB socket sends only what is subscribed)."""
    n = itertools.count()

    def arrived() -> bool:
        answer = sender.notify(to, f"probe {next(n)}")
        assert answer.status == 202, answer
        return bool(client.messages("notes", "notification"))

    wait_until(arrived, 10, interval=0.05, message="no probe notification arrived")


def bad_tokens(secret: str) -> list[tuple[str, str | None, str]]:
    """(kind, token or None for no token, what the worker logs when it refuses it)."""
    def tampered() -> str:   # a real token for "mallory" with the data of one for "alice"
        header, _, mac = sign(secret, SALT, "mallory").split(".")
        return f"{header}.{sign(secret, SALT, 'alice').split('.')[1]}.{mac}"

    return [
        ("absent", None, "token missing"),
        ("forged", sign("not the app's secret_key_base, forged", SALT, "alice"), "token invalid"),
        ("tampered", tampered(), "token invalid"),
        ("wrong salt", sign(secret, "user auth", "alice"), "token invalid"),
    ]


def run_pages_in_chromium(url: str, name: str) -> dict:
    """Alice and Bob log in on the example's page in Chromium and notify each other through
    it; returns what each page shows (status, notifications).  Screenshot in tests/artifacts/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(["node", "tests/js/browser_webapp.js", url, str(ARTIFACTS), name],
                         cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, f"browser run failed:\n{run.stderr[-3000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])
