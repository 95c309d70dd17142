"""The types of what a handler receives and sends, for type checkers (``from zchannels import ...``).

Phoenix payloads are JSON or binary (PROTOCOL §4.5).  Decoded JSON arrives as plain Python
values; the members of arrays and objects are typed ``Any``, so once a value is narrowed
(``isinstance(payload, dict)``, or a ``match`` pattern) its fields can be read without casts.

=====================  ===============================================================
``JSON``               any JSON value: what ``join`` receives, what ``reply`` may carry
``JSONObject``         a JSON object (``dict`` with ``str`` keys): join replies, presence metas
``Binary``             bytes sent as a binary frame (``bytes``, ``bytearray``, ``memoryview``)
``Payload``            a client push, as ``handle_in`` receives it: ``JSON``, or ``bytes``
``BroadcastPayload``   what ``push`` and ``broadcast`` send: a ``JSONObject`` or ``Binary``
``OutPayload``         an intercepted broadcast, as ``handle_out`` receives it
=====================  ===============================================================
"""
from typing import Any, TypeAlias

__all__ = ["JSON", "JSONObject", "Binary", "Payload", "BroadcastPayload", "OutPayload"]

JSONObject: TypeAlias = dict[str, Any]
JSON: TypeAlias = JSONObject | list[Any] | str | int | float | bool | None
Binary: TypeAlias = bytes | bytearray | memoryview
Payload: TypeAlias = JSON | bytes
BroadcastPayload: TypeAlias = JSONObject | Binary
OutPayload: TypeAlias = JSONObject | bytes
