"""sam3d-jobs, the server: its ``sam3d-jobs`` command (``cli``) and the embedded dev stack.

The server's own packages, ``jobs/``, ``api/`` and ``worker/``, are an application run from
its source tree (a checkout, or ``/app`` in the images), not a library: no distribution
installs them, so their generic names never land in anyone's site-packages. This package,
the one the ``sam3d-jobs`` distribution installs, puts that tree on ``sys.path`` when it sits
beside it (a checkout with ``pip install -e .``); the images set ``PYTHONPATH=/app``.
"""

from __future__ import annotations

import sys
from pathlib import Path

SOURCE_TREE = Path(__file__).resolve().parent.parent


def _use_source_tree() -> None:
    if (SOURCE_TREE / "jobs" / "__init__.py").is_file() and str(SOURCE_TREE) not in sys.path:
        sys.path.insert(0, str(SOURCE_TREE))


_use_source_tree()
