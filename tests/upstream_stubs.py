"""Stand-ins for the third-party packages upstream SAM 3D imports that cannot be installed on
this CPU-only host (spconv, pytorch3d, hydra, ...), so that upstream's own modules (the pinned
``sam3d`` in ``.venv/upstream``) import and their names can be looked up. Only names defined
in ``sam3d_objects`` itself are meaningful through them; nothing of the stubs is executed."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

VENDORED = Path(sys.prefix) / "upstream" / "sam3d" / "third_party" / "meta"
STUBBED = frozenset(
    {
        "astor", "diff_gaussian_rasterization", "diffoctreerast", "easydict", "gsplat", "hydra",
        "igraph", "kaolin", "lightning", "matplotlib", "moge", "nvdiffrast", "open3d", "optree",
        "plotly", "pymeshfix", "pytorch3d", "pyvista", "safetensors", "seaborn", "spconv",
        "timm", "torchsparse", "torchvision", "utils3d", "vox2seq", "xatlas", "xformers",
    }
)  # fmt: skip


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (_Stub,), {})

    def __or__(cls, other):
        return cls

    __ror__ = __or__

    def __getitem__(cls, item):
        return cls


class _Stub(metaclass=_Meta):
    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub()


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (_Stub,), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


@contextlib.contextmanager
def pinned_upstream() -> Iterator[None]:
    """Upstream importable (the third-party packages it needs stubbed) within; afterwards the
    rest of the suite runs as on a host without upstream."""
    if not VENDORED.is_dir():
        raise RuntimeError(f"{VENDORED} is missing: make install-dev installs it")
    finder = _Finder()
    saved_env = {
        k: os.environ.get(k) for k in ("LIDRA_SKIP_INIT", "ATTN_BACKEND", "SPARSE_ATTN_BACKEND")
    }
    os.environ["LIDRA_SKIP_INIT"] = "true"
    os.environ["ATTN_BACKEND"] = os.environ["SPARSE_ATTN_BACKEND"] = "sdpa"
    sys.meta_path.insert(0, finder)
    sys.path.insert(0, str(VENDORED))
    try:
        yield
    finally:
        sys.path.remove(str(VENDORED))
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] in {"sam3d_objects", *STUBBED}]:
            if name.split(".")[0] == "sam3d_objects" or isinstance(sys.modules[name], _StubModule):
                del sys.modules[name]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
