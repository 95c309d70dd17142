"""Loading the user's handler module: an app spec -> its ``workers.Socket``.

A worker (workers/runner.py) loads the module named on the command line, such as
``examples/chat/channels.py`` or ``my_package.channels:socket``, once at start; a module
that cannot be loaded is an ``AppLoadError`` naming the spec and the cause, which the
worker turns into a ConfigError so that its supervisor stops instead of restarting it.
``describe`` makes it one line that ends with the user's own failing line (file:line), not
with importlib's internals.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import sysconfig
from typing import Any

from zchannels.workers.api import History, Socket

__all__ = ["AppLoadError", "describe", "load_app", "parse_spec"]


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
    app.history = _history_rules(spec, getattr(module, "history", ()))
    return app


def _history_rules(spec: str, declared: Any) -> tuple[History, ...]:
    """The module's ``history = [History("room:*", keep=1000, seconds=300), ...]``."""
    if isinstance(declared, History):
        declared = [declared]
    if not isinstance(declared, (list, tuple)) or not all(isinstance(r, History) for r in declared):
        raise AppLoadError(f"cannot load app {spec!r}: `history` must be a list of "
                           f"zchannels.History(pattern, keep=..., seconds=...), got {declared!r}")
    return tuple(declared)



# Directories whose files are never the user's own line: the interpreter's and installed
# libraries', and this package's (a module calling the handler API wrongly fails in it).
_NOT_THE_USERS = tuple({os.path.join(os.path.realpath(path), "") for path in (
    *(sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")),
    os.path.dirname(__file__))})


def raised_at(exc: BaseException | None) -> str:
    """\" (at path/file.py:12)\": the line of the user's own code that raised ``exc`` (the
    deepest such frame; else the deepest outside importlib and this module), or "" when no
    code ran, as for a module that does not exist."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f" (at {exc.filename}:{exc.lineno})"
    users: list[tuple[str, int]] = []
    others: list[tuple[str, int]] = []
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        real = os.path.realpath(name)
        if not name.startswith("<") and os.path.basename(os.path.dirname(real)) != "importlib" \
                and real != os.path.realpath(__file__):
            (others if real.startswith(_NOT_THE_USERS) else users).append((name, tb.tb_lineno))
        tb = tb.tb_next
    found = users or others
    return f" (at {found[-1][0]}:{found[-1][1]})" if found else ""


def describe(exc: AppLoadError) -> str:
    """``exc`` as one line: what could not be loaded, why, and where the user's code raised."""
    return f"{exc}{raised_at(exc.__cause__)}"
