"""Connect params from a query string, decoded the way Plug decodes them.

phoenix.js sends nested objects as ``a[b]=1`` and arrays as ``a[0]=x``; Phoenix
turns both into nested maps with string values (``a[0]`` gives the key
``"0"``, not a list), so handlers written for Phoenix see the same shapes here.
"""
from __future__ import annotations

import re
from urllib.parse import parse_qsl

_SEGMENT = re.compile(r"\[([^\[\]]*)\]")


def decode_params(query: str) -> dict:
    params: dict = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        head, _, rest = key.partition("[")
        path = [head] + (_SEGMENT.findall("[" + rest) if rest else [])
        _put(params, path, value)
    return params


def _put(target: dict, path: list[str], value: str) -> None:
    if path[-1] == "" and len(path) > 1:  # a[]=x: Plug collects a list
        path, value = path[:-1], [value]
    for part in path[:-1]:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            nxt = target[part] = {}
        target = nxt
    last = path[-1]
    if isinstance(value, list) and isinstance(target.get(last), list):
        target[last].extend(value)
    else:
        target[last] = value
