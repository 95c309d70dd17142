"""The built wheel, installed into a fresh virtualenv in an empty folder: `zchannels dev` serves the
chat example it carries, with phoenix.js, WebSocket, LongPoll and the status page (and over TLS
with a self-signed certificate), with nothing of the checkout (no node_modules, no source tree)
on its path."""
from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.jsclient import JsClient
from tests.tlscert import make_cert

pytestmark = pytest.mark.skipif(os.environ.get("ZCH_SKIP_WHEEL") == "1", reason="ZCH_SKIP_WHEEL=1")


def run(cmd: list[str], cwd: Path, timeout: float) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result.stdout


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5, context=context) as resp:
        return resp.status, resp.read()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtualenv with only the built wheel (and its dependencies) installed."""
    base = tmp_path_factory.mktemp("wheel")
    run(["bash", "scripts/build", str(base / "dist")], ROOT, 300)
    wheel = next((base / "dist").glob("zchannels-*.whl"))
    run([sys.executable, "-m", "venv", str(base / "venv")], base, 120)
    run([str(base / "venv/bin/python"), "-m", "pip", "install", "-q", str(wheel)], base, 600)
    return base / "venv"


def start_dev(venv: Path, folder: Path, *flags: str) -> tuple[subprocess.Popen, str, str]:
    """`zchannels dev` of the installed wheel, run from ``folder``: (process, URL, status page URL)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dev = subprocess.Popen([str(venv / "bin/zchannels"), "dev", "--port", "0", "--bus", "tcp://127.0.0.1:0",
                            "-n", "1", *flags], cwd=folder, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    found: dict[str, str] = {}
    both = threading.Event()

    def read() -> None:   # all of it, so the pipe never fills
        for line in dev.stderr:
            lines.append(line)
            for key, pattern in (("http", r"zchannels dev running: open (https?://\S+)"),
                                 ("status", r"status page: (https?://\S+)")):
                if m := re.search(pattern, line):
                    found[key] = m.group(1)
            if len(found) == 2:
                both.set()

    threading.Thread(target=read, daemon=True).start()
    if not both.wait(60):
        dev.kill()
        raise AssertionError("zchannels dev did not start:\n" + "".join(lines)[-3000:])
    return dev, found["http"], found["status"]


def stop_dev(dev: subprocess.Popen) -> int:
    dev.terminate()
    try:
        return dev.wait(20)
    except subprocess.TimeoutExpired:
        dev.kill()
        return dev.wait(5)


@pytest.mark.timeout(900)
def test_the_wheel_installs_only_zchannels_and_knows_its_version(installed):
    site = Path(run([str(installed / "bin/python"), "-c",
                     "import zchannels, os; print(os.path.dirname(os.path.dirname(zchannels.__file__)))"],
                    installed.parent, 30).strip())
    ours = {p.name for p in site.iterdir() if p.name.startswith(("zchannels", "broker", "bus", "edge", "workers"))}
    assert ours == {"zchannels", *(p.name for p in site.glob("zchannels-*.dist-info"))}, ours
    out = run([str(installed / "bin/zchannels"), "--version"], installed.parent, 30)
    assert re.fullmatch(r"zchannels \d+\.\d+\.\d+\S*\n", out), out
    api = run([str(installed / "bin/python"), "-c",
               "from zchannels import Channel, Socket, ok, error, reply, Publisher; print('ok')"],
              installed.parent, 30)
    assert api == "ok\n"


@pytest.mark.timeout(900)
def test_zchannels_dev_from_the_wheel_serves_the_chat_with_phoenix_js_longpoll_and_status(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    dev, http, status_url = start_dev(installed, empty)
    client, poller = JsClient(), JsClient("lp")
    try:
        status, page = get(http + "/")
        assert status == 200 and b"phoenix" in page.lower()
        status, js = get(http + "/js/phoenix.js")
        assert status == 200 and b"Socket" in js
        status, js = get(http + "/js/zchannels-recovery.js")
        assert status == 200 and b"zc_since" in js
        status, html = get(status_url)
        assert status == 200 and b"zchannels" in html
        client.connect(http.replace("http://", "ws://") + "/socket", params={"user": "ann"})
        assert client.join("lobby", "room:lobby", {}, on=["new_msg"])["status"] == "ok"
        poller.connect(http + "/socket", params={"user": "bob"}, transport="longpoll")
        assert poller.join("lobby", "room:lobby", {}, on=["new_msg"])["status"] == "ok"
        client.push("lobby", "new_msg", {"body": "from the wheel"})
        client.wait_event({"type": "message", "chan": "lobby", "event": "new_msg"}, timeout=5)
        poller.wait_event({"type": "message", "chan": "lobby", "event": "new_msg"}, timeout=10)
    finally:
        poller.close()
        client.close()
        code = stop_dev(dev)
    assert code == 0


@pytest.mark.timeout(900)
def test_zchannels_dev_from_the_wheel_serves_wss_and_https_longpoll_with_a_self_signed_cert(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cert, key = make_cert(tmp_path)
    dev, https, status_url = start_dev(installed, empty, "--certfile", str(cert), "--keyfile", str(key))
    trust = ssl.create_default_context(cafile=str(cert))
    client = JsClient(env={"NODE_EXTRA_CA_CERTS": str(cert)})
    poller = JsClient("lp", env={"NODE_EXTRA_CA_CERTS": str(cert)})
    try:
        assert https.startswith("https://")
        assert get(https + "/js/phoenix.js", trust)[0] == 200
        assert get(status_url, trust)[0] == 200
        client.connect(https.replace("https://", "wss://") + "/socket", params={"user": "ann"})
        assert client.join("lobby", "room:lobby", {}, on=["new_msg"])["status"] == "ok"
        poller.connect(https + "/socket", params={"user": "bob"}, transport="longpoll")
        assert poller.join("lobby", "room:lobby", {}, on=["new_msg"])["status"] == "ok"
        client.push("lobby", "new_msg", {"body": "over tls"})
        poller.wait_event({"type": "message", "chan": "lobby", "event": "new_msg"}, timeout=10)
        client.wait_event({"type": "message", "chan": "lobby", "event": "new_msg"}, timeout=5)
    finally:
        poller.close()
        client.close()
        code = stop_dev(dev)
    assert code == 0
