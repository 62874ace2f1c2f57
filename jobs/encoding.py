"""Base64 as clients send it, accepted in one set of forms for every input (images, depth
maps, pointmaps, mask PNGs): an optional ``data:...;base64,`` prefix, whitespace and line
breaks anywhere (MIME wraps at 76 columns), the URL-safe alphabet (``-`` ``_``), and missing
``=`` padding."""

from __future__ import annotations

import base64
import binascii


def decode_base64(text: str) -> bytes:
    """The bytes of ``text`` in any of the accepted forms; ``ValueError`` otherwise."""
    text = text.strip()
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError("a data URL without a ';base64,' payload")
        text = payload
    text = "".join(text.split()).translate({ord("-"): "+", ord("_"): "/"})
    if len(text) % 4 == 1:
        raise ValueError("truncated base64 (one character too many or a whole group missing)")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None
