"""Topic routes (``"room:*"`` -> a Channel class) and loading the user's handler module.

A worker routes every join itself: the edge never imports user code (DESIGN principle 1),
so the socket's channel table lives here, next to the code that finds the user's
``Socket`` from an app spec such as ``examples/chat/channels.py`` or
``my_package.channels:socket``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

from bus import wire

if TYPE_CHECKING:
    from workers.api import Channel, Socket

__all__ = ["Route", "AppLoadError", "load_app", "parse_spec", "check_pattern", "SYSTEM_PREFIX"]

# Topics under this prefix belong to zchannels itself (workers/status.py); apps cannot route them.
SYSTEM_PREFIX = wire.SYSTEM_TOPIC_PREFIX


def check_pattern(pattern: Any) -> str:
    """Validate a route pattern: an exact topic, or a prefix followed by one trailing ``*``."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"a channel route pattern must be a non-empty string, got {pattern!r}")
    if "*" in pattern[:-1]:
        raise ValueError(f"channel route {pattern!r}: '*' is allowed only once, as the last "
                         "character (\"room:*\")")
    return pattern


class Route:
    """One ``socket.channel(pattern, Channel, assigns=...)`` declaration."""
    __slots__ = ("pattern", "channel", "assigns", "_prefix")

    def __init__(self, pattern: str, channel: type[Channel], assigns: dict[str, Any] | None = None):
        self.pattern = check_pattern(pattern)
        self.channel = channel
        self.assigns = assigns or {}
        # Phoenix: "room:*" matches every topic starting with "room:", "room:" included.
        self._prefix = pattern[:-1] if pattern.endswith("*") else None

    def matches(self, topic: str) -> bool:
        if self._prefix is None:
            return topic == self.pattern
        return topic.startswith(self._prefix)

    def __repr__(self) -> str:
        return f"Route({self.pattern!r}, {self.channel.__name__})"


class AppLoadError(Exception):
    """The handler module named by an app spec could not be loaded."""


def parse_spec(spec: str) -> tuple[str, str]:
    """``"pkg.mod:attr"`` or ``"path/file.py:attr"`` -> (module or path, attr); attr defaults to socket."""
    target, colon, attr = spec.rpartition(":")
    if not colon or not attr.isidentifier():
        target, attr = spec, "socket"
    if not target:
        raise AppLoadError(f"app spec {spec!r} is empty; expected package.module[:attr] "
                           "or path/to/file.py[:attr]")
    return target, attr


def _is_path(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def _import_file(spec: str, path: str) -> Any:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise AppLoadError(f"cannot load app {spec!r}: no such file {path}")
    directory, name = os.path.split(path)
    name = os.path.splitext(name)[0]
    if not name.isidentifier() or name in sys.modules:
        name = f"zchannels_app_{abs(hash(path)):x}"
    # Like `python file.py`: the file's directory comes first, so it can import its siblings.
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise AppLoadError(f"cannot load app {spec!r}: {path} is not a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if not isinstance(exc, Exception):
            raise
        raise AppLoadError(f"cannot load app {spec!r}: running {path} raised "
                           f"{type(exc).__name__}: {exc}") from exc
    return module


def _import_module(spec: str, name: str) -> Any:
    # Like uvicorn/gunicorn: `package.module` is looked up from the current directory too.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise AppLoadError(f"cannot load app {spec!r}: no module named {exc.name!r} "
                               f"(searched from {cwd})") from exc
        raise AppLoadError(f"cannot load app {spec!r}: importing {name} failed: {exc}") from exc
    except Exception as exc:
        raise AppLoadError(f"cannot load app {spec!r}: importing {name} raised "
                           f"{type(exc).__name__}: {exc}") from exc


def load_app(spec: str) -> Socket:
    """Import the handler module named by ``spec`` and return its ``workers.Socket``.

    ``spec`` is ``package.module[:attr]`` or ``path/to/file.py[:attr]``; ``attr``
    defaults to ``socket``.  Raises ``AppLoadError`` naming the spec and the cause.
    """
    from workers.api import Socket

    target, attr = parse_spec(spec)
    module = _import_file(spec, target) if _is_path(target) else _import_module(spec, target)
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise AppLoadError(f"cannot load app {spec!r}: module {module.__name__} has no attribute "
                           f"{attr!r} (declare `{attr} = Socket()` at module level)") from None
    if not isinstance(app, Socket):
        raise AppLoadError(f"cannot load app {spec!r}: {attr} is a {type(app).__name__}, "
                           "expected a workers.Socket")
    return app
