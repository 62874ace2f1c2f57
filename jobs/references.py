"""Generated references in the docs: a section between two marker lines, rewritten from code
(``python -m jobs.errors``, ``python -m jobs.settings``) and checked by the tests."""

from __future__ import annotations


def section(begin: str, body: str, end: str) -> str:
    return f"{begin}\n{body}\n{end}"


def rewrite_section(path: str, begin: str, end: str, body: str) -> None:
    """Replace what lies between ``begin`` and ``end`` (both kept) in the file at ``path``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, stop = text.index(begin), text.index(end) + len(end)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:start] + section(begin, body, end) + text[stop:])
