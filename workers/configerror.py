"""How a worker says its configuration can never work, and how its supervisor hears it.

A worker that cannot load the handler module, or is given a malformed bus address, raises
``ConfigError``; its process exits with the reserved code ``HANDLER_LOAD_ERROR``.  The
supervisor (workers/supervisor.py) stops on that code instead of restarting the worker in a
hot loop, since no restart can fix it.  Both sides import this module, so neither imports the
other for it.
"""
from __future__ import annotations

# Reserved exit code of a worker whose configuration can never work (its target raised
# ConfigError, e.g. the handler module cannot be imported).  Restarting cannot fix that, so the
# supervisor stops, with its CONFIG_ERROR_EXIT, instead of looping.
HANDLER_LOAD_ERROR = 4


class ConfigError(Exception):
    """Raised by a worker target whose configuration can never work (the handler module cannot
    be imported, a malformed bus address): the supervisor logs the message once and stops with
    exit code 2 instead of restarting the worker forever."""
