"""Topic routes and loading the user's handler module (workers/routes.py, workers/loadapp.py,
workers/api.Socket)."""
import os
import sys
import textwrap

import pytest

from zchannels.workers import AppLoadError, Channel, Socket, load_app
from zchannels.workers.api import BadReturn, check_result, error, noreply, ok, reply, stop
from zchannels.workers.loadapp import parse_spec
from zchannels.workers.routes import Route

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class A(Channel):
    pass


class B(Channel):
    pass


@pytest.mark.parametrize("pattern, topic, expected", [
    ("room:lobby", "room:lobby", True),
    ("room:lobby", "room:lobby2", False),
    ("room:lobby", "room:", False),
    ("room:*", "room:lobby", True),
    ("room:*", "room:", True),
    ("room:*", "room", False),
    ("room:*", "rooms:1", False),
    ("*", "anything:at:all", True),
])
def test_route_matches_exact_topics_and_trailing_star_prefixes(pattern, topic, expected):
    assert Route(pattern, A).matches(topic) is expected


@pytest.mark.parametrize("pattern", ["", "room:*:x", "ro*m:*", "**", None, 5])
def test_route_pattern_with_inner_star_or_empty_is_rejected(pattern):
    with pytest.raises(ValueError):
        Route(pattern, A)


def test_first_declared_matching_route_wins():
    socket = Socket()
    socket.channel("room:special", B)
    socket.channel("room:*", A)
    socket.channel("room:other", B)
    assert socket.route("room:special").channel is B
    assert socket.route("room:other").channel is A
    assert socket.route("lobby") is None


def test_channel_route_requires_channel_subclass_and_valid_intercept():
    socket = Socket()
    with pytest.raises(TypeError, match="Channel subclass"):
        socket.channel("room:*", object)

    class BadIntercept(Channel):
        intercept = "user_joined"

    with pytest.raises(TypeError, match="intercept"):
        socket.channel("room:*", BadIntercept)
    with pytest.raises(TypeError, match="assigns"):
        socket.channel("room:*", A, assigns=[1])


def test_route_assigns_are_kept():
    socket = Socket()
    socket.channel("admin", A, assigns={"admin": True})
    assert socket.route("admin").assigns == {"admin": True}


@pytest.mark.parametrize("spec, expected", [
    ("pkg.mod", ("pkg.mod", "socket")),
    ("pkg.mod:app", ("pkg.mod", "app")),
    ("path/to/file.py", ("path/to/file.py", "socket")),
    ("path/to/file.py:other", ("path/to/file.py", "other")),
])
def test_parse_spec_defaults_attr_to_socket(spec, expected):
    assert parse_spec(spec) == expected


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


APP = """
    from zchannels.workers import Channel, Socket, ok
    class C(Channel):
        def join(self, topic, payload, socket):
            return ok()
    socket = Socket()
    socket.channel("t:*", C)
    other = Socket()
    not_a_socket = 42
"""


def test_load_app_from_file_path_with_default_and_named_attr(tmp_path):
    app_file = write(tmp_path / "myapp_file.py", APP)
    app = load_app(str(app_file))
    assert isinstance(app, Socket) and app.route("t:1") is not None
    assert isinstance(load_app(f"{app_file}:other"), Socket)


def test_load_app_from_module_path(tmp_path, monkeypatch):
    pkg = tmp_path / "zc_test_pkg"
    pkg.mkdir()
    write(pkg / "__init__.py", "")
    write(pkg / "channels.py", APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = load_app("zc_test_pkg.channels")
    assert app.route("t:x").channel.__name__ == "C"
    assert isinstance(load_app("zc_test_pkg.channels:other"), Socket)


def test_load_app_resolves_module_paths_from_the_current_directory(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", ROOT)])
    app = load_app("examples.chat.channels")
    assert app.route("room:lobby") is not None


def test_load_app_missing_module_names_spec_and_module():
    with pytest.raises(AppLoadError, match=r"'no_such_mod_zc:socket'.*no module named 'no_such_mod_zc'"):
        load_app("no_such_mod_zc:socket")


def test_load_app_missing_file_names_spec(tmp_path):
    with pytest.raises(AppLoadError, match="no such file"):
        load_app(str(tmp_path / "nope.py"))


def test_load_app_missing_attr(tmp_path):
    app_file = write(tmp_path / "myapp_attr.py", APP)
    with pytest.raises(AppLoadError, match="has no attribute 'missing'"):
        load_app(f"{app_file}:missing")


def test_load_app_wrong_type(tmp_path):
    app_file = write(tmp_path / "myapp_type.py", APP)
    with pytest.raises(AppLoadError, match="not_a_socket is a int, expected a workers.Socket"):
        load_app(f"{app_file}:not_a_socket")


def test_load_app_module_that_raises_reports_the_cause(tmp_path):
    app_file = write(tmp_path / "myapp_raises.py", "import no_such_dependency_zc\n")
    with pytest.raises(AppLoadError, match="ModuleNotFoundError.*no_such_dependency_zc") as info:
        load_app(str(app_file))
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_load_app_module_whose_dependency_is_missing_is_not_reported_as_missing_itself(tmp_path, monkeypatch):
    write(tmp_path / "zc_dep_user.py", "import no_such_dependency_zc2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AppLoadError, match="importing zc_dep_user failed.*no_such_dependency_zc2"):
        load_app("zc_dep_user")


def test_load_app_of_the_shipped_apps():
    assert load_app(os.path.join(ROOT, "examples/chat/channels.py")).route("room:42") is not None
    e2e = load_app(os.path.join(ROOT, "tests/apps/e2e_app.py"))
    assert e2e.route("terminations:terminate:x").channel.__name__ == "EchoChannel"
    assert e2e.route("terminate:x").channel.__name__ == "TerminateChannel"


@pytest.mark.parametrize("callback, value, valid", [
    ("join", ok(), True), ("join", ok({"a": 1}), True), ("join", error({"reason": "x"}), True),
    ("join", noreply(), False), ("join", None, False), ("join", True, False),
    ("handle_in", reply("ok"), True), ("handle_in", noreply(), True),
    ("handle_in", stop("normal", reply=("ok", {})), True), ("handle_in", 42, False),
    ("handle_in", ok(), False), ("handle_out", noreply(), True), ("handle_out", stop("x"), True),
    ("handle_out", reply("ok"), False), ("handle_out", stop("x", reply="ok"), False),
    ("handle_info", noreply(), True), ("handle_info", None, False),
])
def test_return_shapes_are_checked_per_callback(callback, value, valid):
    if valid:
        check_result(A(), callback, value)
    else:
        with pytest.raises(BadReturn, match=rf"A\.{callback} returned .*valid returns: "):
            check_result(A(), callback, value)


def test_stop_graceful_reasons():
    assert stop("normal").graceful and stop("shutdown").graceful and stop(("shutdown", 1)).graceful
    assert not stop("boom").graceful and not stop(("boom", 1)).graceful


def test_shape_helpers_validate_their_arguments():
    with pytest.raises(TypeError):
        ok([1])
    with pytest.raises(TypeError):
        reply(5)
    with pytest.raises(TypeError):
        stop("normal", reply=3)
    assert error("nope").reply == {"reason": "nope"}
    assert reply("ok").response == {}
    assert stop("shutdown", reply=("ok", {"a": 1})).reply.response == {"a": 1}


def test_push_outside_a_joined_channel_raises_runtime_error():
    with pytest.raises(RuntimeError, match="before the join"):
        A().push("e", {})
