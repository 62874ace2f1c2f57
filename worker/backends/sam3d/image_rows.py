"""The condition embedders' DINO image encoders run once for the photo every object of a part
shares (``shared_image_rows``)."""

from __future__ import annotations

import contextlib
import importlib

from worker.backends.sam3d import patching
from worker.backends.sam3d.patching import Patch

_DINO_MODULE = "sam3d_objects.model.backbone.dit.embedder.dino"


def _once_for_equal_rows(own):
    """``own`` (an image encoder's forward) on the first row alone where every row of the
    batch is the same image, its output repeated; else on the batch."""
    import torch

    def forward(x, **kwargs):
        if torch.is_tensor(x) and x.shape[0] > 1 and torch.equal(x, x[:1].expand_as(x)):
            one = own(x[:1], **kwargs)
            return one.expand(x.shape[0], *one.shape[1:]).contiguous()
        return own(x, **kwargs)

    return forward


def dino_encoders(pipeline) -> list:
    """The condition embedders' DINO image encoders, upstream's own class and forward, each
    once (an encoder two embedders share is one); none where upstream has no such class."""
    try:
        dino = importlib.import_module(_DINO_MODULE)
    except ImportError:
        return []
    embedders = dict(getattr(pipeline, "condition_embedders", None) or {})
    found = {
        id(m): m
        for e in embedders.values()
        if e is not None and hasattr(e, "modules")
        for m in e.modules()
        if type(m).forward is dino.Dino.forward and "forward" not in m.__dict__
    }
    return list(found.values())


@contextlib.contextmanager
def shared_image_rows(pipeline, enabled: bool = True):
    """Within: the condition embedders' DINO encoders run once on an image that every object
    of the batch shares. Each object's condition holds the full photo (its "rgb_image"
    input) besides its own crop and masks: the same 518 px image for every object of a
    part, which upstream's batch would encode once per object (one of the four DINO passes
    per object in each of the two embedders). The comparison (``torch.equal``) costs one
    read-back per encoder call; the output equals a batch-of-one pass, as ``run()`` has it."""
    encoders = dino_encoders(pipeline) if enabled else []
    patches = [
        Patch(encoder, "forward", _once_for_equal_rows(encoder.forward), "shared_image_rows")
        for encoder in encoders
    ]
    with patching.scoped(patches):
        yield len(encoders)
