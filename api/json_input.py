"""JSON from callers, parsed defensively: no NaN or Infinity, no number that overflows to
infinity (``1e400``), no nesting deeper than ``MAX_DEPTH``; each refused with a stable code."""

from __future__ import annotations

import json
import math
from typing import Any

from flask.json.provider import DefaultJSONProvider

from jobs.errors import ErrorCode, Sam3dError

# Deeper than any input needs (a COCO file or a list of binary masks is 5 or 6 levels).
MAX_DEPTH = 64


def _bad(message: str) -> Sam3dError:
    return Sam3dError(ErrorCode.INVALID_REQUEST, message)


def _no_constant(name: str) -> Any:
    raise _bad(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _bad(f"the number {text[:40]} is out of range")
    return value


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise ``invalid_request`` when ``value`` nests lists and objects deeper than ``limit``
    (iteratively: a hostile body cannot exhaust the stack here)."""
    stack = [(value, 1)] if isinstance(value, list | dict) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise _bad(f"the JSON nests deeper than {limit} levels")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, list | dict))


def loads_input(text: str | bytes) -> Any:
    """``json.loads`` for untrusted input; syntax errors stay ``ValueError``."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise _bad(f"the JSON nests deeper than {MAX_DEPTH} levels") from None
    check_depth(value)
    return value


class InputJSONProvider(DefaultJSONProvider):
    """Flask's JSON with request bodies read by ``loads_input``."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads_input(s)
