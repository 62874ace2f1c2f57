"""The Redis key layout lives in jobs/keys.py alone."""

from __future__ import annotations

import re
from pathlib import Path

import jobs.keys as keys_module
from jobs.keys import PREFIX, Keys

ROOT = Path(__file__).resolve().parents[1]


def test_every_key_is_under_the_prefix_and_documented():
    keys = Keys("test")
    for name in dir(Keys):
        if name.startswith("_") or name == "prefix":
            continue
        method = getattr(keys, name)
        key = method(*["x"] * (method.__code__.co_argcount - 1))
        assert key.startswith("test:"), name
        # The table in the module's docstring names it: "{p}:job:{id}" for "test:job:x".
        head = "{p}:" + key.removeprefix("test:").partition(":x")[0]
        assert f"``{head}" in keys_module.__doc__, name
    assert Keys().job("j") == f"{PREFIX}:job:j"


def test_no_module_builds_a_redis_key_itself():
    built = re.compile(r"""f["']\{(self\.p|self\.prefix|prefix|store\.p|self\.store\.p)\}:""")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for package in ("api", "jobs", "worker")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "keys.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if built.search(line)
    ]
    assert not offenders
