"""Start-up mistakes are one line and exit code 2, with real processes.

Each test runs the real command with one mistake (a busy port, a malformed bus address, a
handler module that does not exist or raises, a missing --static folder...) and checks that
it exits with code 2 having printed exactly one line on stderr, which names what is wrong
(the port, the address, the module, the user's own failing file:line), no traceback, and no
READY line.  For `zchannels dev`, which starts three processes, also that the children it had
started are all gone when it returns, and that a failed start never says "open http://...".
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, Proc

pytestmark = pytest.mark.timeout(60)

MARK = "ZCH_STARTUP_TEST_MARK"   # in the environment of the processes a test starts
UNUSED_BUS = "tcp://127.0.0.1:9"  # nothing listens there; the edge and workers start anyway


def zchannels(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0
              ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zchannels", *map(str, args)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_line(done: subprocess.CompletedProcess, command: str, *named: str) -> str:
    """Exit code 2, one line on stderr naming everything in ``named``, nothing READY."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n"), done.stderr
    assert done.stderr.startswith(f"zchannels {command}: error: "), done.stderr
    for text in named:
        assert text in done.stderr, (text, done.stderr)
    assert "Traceback" not in done.stderr
    assert "READY" not in done.stdout, done.stdout
    assert "running: open" not in done.stdout + done.stderr
    return done.stderr


@pytest.fixture
def busy_port():
    """A port something else listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def write_app(directory: Path, body: str = "") -> Path:
    """A handler module that records the pid of each process importing it in ``directory``."""
    app = directory / "app.py"
    app.write_text(
        "import os\n"
        "from pathlib import Path\n"
        "from zchannels import Channel, Socket, ok\n"
        f"Path({str(directory)!r}, f'imported-{{os.getpid()}}').touch()\n"
        f"{body}"
        "class Echo(Channel):\n"
        "    def join(self, topic, payload, socket):\n"
        "        return ok({})\n"
        "socket = Socket()\n"
        "socket.channel('echo:*', Echo)\n")
    return app


def marked(mark: str) -> dict[int, str]:
    """pid -> command line of every process whose environment has ``MARK=mark``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"{MARK}={mark}".encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode()
        except OSError:   # gone meanwhile
            continue
    return found


def run_dev(*args: str, timeout: float = 30.0) -> tuple[subprocess.CompletedProcess, dict[int, str], float]:
    """`zchannels dev ...` to its end, watching its process tree: (result, every process of it
    seen while it ran, seconds it took)."""
    mark = uuid.uuid4().hex
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "zchannels", "dev", *args], cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, MARK: mark})
    seen: dict[int, str] = {}
    while proc.poll() is None and time.monotonic() - started < timeout:
        seen.update(marked(mark))
        time.sleep(0.02)   # a sampling interval, not a wait for an event
    out, err = proc.communicate(timeout=5)
    took = time.monotonic() - started
    left = {pid: cmd for pid, cmd in marked(mark).items()}
    assert not left, f"still running after dev returned: {left}"
    seen.pop(proc.pid, None)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seen, took


# --- edge ----------------------------------------------------------------------------------

def test_edge_on_a_busy_port_names_the_port(busy_port):
    done = zchannels("edge", "--port", busy_port, "--bus", UNUSED_BUS)
    assert_one_line(done, "edge", f"port {busy_port} on 127.0.0.1 is already in use", "--port")


def test_edge_processes_on_a_busy_port_name_the_port_before_starting_any(busy_port):
    done = zchannels("edge", "--port", busy_port, "--processes", "2", "--bus", UNUSED_BUS)
    assert_one_line(done, "edge", f"port {busy_port} on 127.0.0.1 is already in use")
    assert "edge process started" not in done.stderr


@pytest.mark.parametrize("argv, named", [
    (["--static", "/nonexistent/zch-static"], ["--static /nonexistent/zch-static: no such directory"]),
    (["--host", "192.0.2.1"], ["--host 192.0.2.1: not an address of this machine"]),
    (["--port", "70000"], ["--port 70000 is not a port number"]),
    (["--allowed-origins", "ht!p://x"], ["argument --allowed-origins", "'ht!p://x' has no host"]),
    (["--curve-server-key", "/nonexistent/broker.key", "--curve-secret", "/nonexistent/c.key_secret"],
     ["/nonexistent/broker.key"]),
])
def test_edge_start_up_mistakes_are_one_line(argv, named):
    assert_one_line(zchannels("edge", "--port", "0", "--bus", UNUSED_BUS, *argv), "edge", *named)


# --- the bus ---------------------------------------------------------------------------------

def test_broker_on_a_busy_bus_port_names_the_port(busy_port):
    done = zchannels("broker", "--bus", f"tcp://127.0.0.1:{busy_port}")
    assert_one_line(done, "broker", f"port {busy_port} on 127.0.0.1 (bus routing) is already in use")


@pytest.mark.parametrize("command, extra", [
    ("broker", ["--bus", "tcp://127.0.0.1:0"]),
    ("workers", ["--bus", UNUSED_BUS, "tests/apps/e2e_app.py"]),
])
def test_a_busy_metrics_port_names_the_port(busy_port, command, extra):
    done = zchannels(command, "--metrics-port", busy_port, *extra)
    assert_one_line(done, command, f"cannot serve metrics on 127.0.0.1 port {busy_port} (--metrics-port)")


@pytest.mark.parametrize("command, extra", [
    ("edge", ["--port", "0"]), ("workers", ["tests/apps/e2e_app.py"]), ("broker", []),
    ("dev", ["--port", "0"]), ("publish", ["room:x", "ev", "{}"]),
])
def test_a_malformed_bus_address_is_one_line_naming_it(command, extra):
    done = zchannels(command, "--bus", "localhost:5570", *extra, timeout=20)   # no restart loop
    assert_one_line(done, command, "'localhost:5570'", "tcp://HOST:PORT")


# --- the handler module ------------------------------------------------------------------------

def test_workers_with_a_missing_module_name_it_and_fork_nothing():
    done = zchannels("workers", "--bus", UNUSED_BUS, "no_such_module_zch")
    assert_one_line(done, "workers", "cannot load app 'no_such_module_zch'", "no module named 'no_such_module_zch'")
    assert " (at " not in done.stderr   # no importlib internals for a module that is not there


@pytest.mark.parametrize("body, line, named", [
    ("raise RuntimeError('the app refuses')\n", 5, "raised RuntimeError: the app refuses"),
    ("import no_such_dependency_zch\n", 5, "No module named 'no_such_dependency_zch'"),
    ("def broken(:\n", 5, "raised SyntaxError"),
    ("import json\njson.loads('{')\n", 6, "raised JSONDecodeError"),   # inside the stdlib: the user's line
])
def test_workers_with_a_failing_module_name_the_users_own_line(tmp_path, body, line, named):
    app = write_app(tmp_path, body)
    done = zchannels("workers", "--bus", UNUSED_BUS, "-n", "2", app)
    assert_one_line(done, "workers", f"cannot load app '{app}'", named, f"(at {app}:{line})")
    assert "worker started" not in done.stderr


def test_a_failing_module_of_a_package_names_the_users_line(tmp_path):
    (tmp_path / "zch_pkg").mkdir()
    (tmp_path / "zch_pkg" / "__init__.py").write_text("")
    (tmp_path / "zch_pkg" / "channels.py").write_text("x = 1\nraise ValueError('bad setting')\n")
    done = subprocess.run([sys.executable, "-m", "zchannels", "workers", "--bus", UNUSED_BUS,
                           "zch_pkg.channels"], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_one_line(done, "workers", "zch_pkg.channels", "raised ValueError: bad setting",
                    f"(at {tmp_path / 'zch_pkg' / 'channels.py'}:2)")


# --- dev ---------------------------------------------------------------------------------

def test_dev_with_its_http_port_busy_stops_every_child_at_once(tmp_path, busy_port):
    app = write_app(tmp_path)
    done, seen, took = run_dev("--port", str(busy_port), "--bus", "tcp://127.0.0.1:0", app)
    assert_one_line(done, "dev", f"port {busy_port} on 127.0.0.1 is already in use")
    assert any(" -m zchannels.broker " in cmd for cmd in seen.values()), seen   # it had started the broker
    assert took < 10, took   # not after a 10 s wait for a READY that cannot come


def test_dev_with_an_app_failing_after_the_broker_and_edge_are_up_stops_them(tmp_path):
    # The module raises 1.5 s into its import: by then the broker and the edge are up.
    app = write_app(tmp_path, "import time\ntime.sleep(1.5)\nraise LookupError('no such table')\n")
    done, seen, _ = run_dev("--port", "0", "--bus", "tcp://127.0.0.1:0", "-n", "2", str(app))
    assert_one_line(done, "dev", f"cannot load app '{app}'", "raised LookupError: no such table",
                    f"(at {app}:7)")
    kinds = {kind for kind in ("broker", "edge", "workers") if any(f" -m zchannels.{kind} " in c for c in seen.values())}
    assert kinds == {"broker", "edge", "workers"}, seen


def test_dev_with_a_missing_module_names_it(tmp_path):
    done, _, _ = run_dev("--port", "0", "--bus", "tcp://127.0.0.1:0", "no_such_module_zch")
    assert_one_line(done, "dev", "cannot load app 'no_such_module_zch'")


def test_dev_with_its_bus_port_busy_names_the_port(busy_port):
    done, _, _ = run_dev("--port", "0", "--bus", f"tcp://127.0.0.1:{busy_port}")
    assert_one_line(done, "dev", f"port {busy_port} on 127.0.0.1 (bus routing) is already in use")


@pytest.mark.timeout(60)
def test_dev_without_an_app_runs_the_chat_example_with_any_other_flags():
    """`scripts/dev --port 4001` is `zchannels dev --port 4001`: the chat example, as without flags."""
    proc = Proc("zchannels", "dev", "--port", "0", "--bus", "tcp://127.0.0.1:0", "-n", "1",
                "--status-token", "off", name="dev")
    try:
        line = proc.wait_for(lambda: next((l for l in proc.lines if l.startswith("[edge] READY")), None),
                             30, "the edge's READY line")
        http = dict(kv.split("=", 1) for kv in line.split()[2:])["http"]
        proc.wait_for(lambda: "zchannels dev running: open " + http in proc.stderr_text(), 10, "the URL")
        with urllib.request.urlopen(http + "/", timeout=5) as resp:
            page = resp.read().decode()
        chat_page = (ROOT / "examples" / "chat" / "static" / "index.html").read_text()
        assert page == chat_page
    finally:
        assert proc.stop(15) == 0
        proc.cleanup()
