"""How a process says it cannot start: ``StartupError``, printed by `zchannels` as one line.

A start-up mistake (a busy port, a malformed bus address, a handler module that cannot be
imported) is found deep inside the broker, an edge or the workers supervisor, but told at the
top: the command line (zchannels/cli.py) catches ``StartupError`` and prints
``zchannels COMMAND: error: TEXT`` on stderr, with no traceback, and exits with
``STARTUP_ERROR_EXIT``.  The text names what is wrong (the port, the address, the module and
the user's failing line) so that the one line is enough to fix it.
"""
from __future__ import annotations

STARTUP_ERROR_EXIT = 2


class StartupError(Exception):
    """A configuration mistake found while starting; its text is the whole error message."""
