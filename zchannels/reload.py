"""`zchannels dev --reload`: watch the app's source files and roll the workers onto new code.

The watcher polls modification times (no extra dependency, no inotify limits): the app's
file and every ``*.py`` under its folder (a path APP), or under its top-level package's
folder (a module APP), skipping ``__pycache__``, virtualenvs and hidden folders.  On a
change `zchannels dev` sends SIGHUP to the workers' supervisor, which replaces its workers
one by one (the same as SIGHUP in production, see the README): each new worker
imports the app afresh, and the clients of a replaced worker get ``phx_error`` and rejoin
by themselves (phoenix.js does), on new code once every worker has been replaced.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SKIP_DIRS = {"__pycache__", "node_modules", ".venv", "venv", ".git", ".tox", ".mypy_cache"}
MAX_FILES = 2000     # a watch over a huge folder would cost more than it saves


def watched_root(app_spec: str) -> Path | None:
    """The folder whose ``*.py`` files make up the app, or None when it cannot be found
    (the workers will say why they cannot load it)."""
    target = app_spec.partition(":")[0]
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target).resolve()
        return path.parent if path.is_file() else None
    top = target.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:          # a package: its whole folder
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(spec.origin).resolve().parent if spec.origin else None


class SourceWatcher:
    """The ``*.py`` files under one folder and their modification times."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen = self._scan()

    def _scan(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    try:
                        found[path] = os.stat(path).st_mtime_ns
                    except OSError:      # removed while we looked
                        continue
                    if len(found) >= MAX_FILES:
                        return found
        return found

    def changed(self) -> list[str]:
        """Files added, removed or modified since the last call, relative to the root."""
        now = self._scan()
        diff = sorted(p for p in now.keys() | self.seen.keys() if now.get(p) != self.seen.get(p))
        self.seen = now
        return [os.path.relpath(p, self.root) for p in diff]
