"""A reduced SAM 3 for CPU tests: Meta's PyPI ``sam3`` code and builder, random weights, with
2 of 32 ViT blocks, a 1-layer text encoder and 1-layer fusion encoder and decoder (the full
model takes minutes per image on two CPU cores). Every other part, the image size (1008)
and the prompt heads are the library's own.

PyPI's torchvision wheels are built against CUDA PyTorch, so with the CPU torch of these
machines their C operators cannot load; torchvision then runs its own pure-PyTorch
``roi_align`` (what sam3 uses). ``declare_torchvision_ops`` only declares the two operator
schemas torchvision's import registers fakes for, so that it imports at all. This is the one
stand-in: no real torchvision C extension can run here.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any

_declared: list = []


def declare_torchvision_ops() -> None:
    """Let ``import torchvision`` succeed where its C extension cannot load."""
    import torch

    if _declared:
        return
    try:
        import torchvision  # noqa: F401

        _declared.append(None)
        return
    except RuntimeError:
        pass
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _declared.append(lib)  # kept alive: dropping it would undeclare them
    import torchvision  # noqa: F401, F811


def sam3_importable() -> bool:
    return all(importlib.util.find_spec(m) for m in ("torch", "torchvision", "sam3", "triton"))


@contextlib.contextmanager
def reduced_builders():
    """sam3's builder functions swapped for smaller ones while the model is built."""
    import sam3.model_builder as mb
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT

    def vit(compile_mode=None):
        return ViT(img_size=1008, pretrain_img_size=336, patch_size=14, embed_dim=1024, depth=2,
                   num_heads=16, mlp_ratio=4.625, norm_layer="LayerNorm", drop_path_rate=0.0,
                   qkv_bias=True, use_abs_pos=True, tile_abs_pos=True, global_att_blocks=(1,),
                   rel_pos_blocks=(), use_rope=True, use_interp_rope=True, window_size=24,
                   pretrain_use_cls_token=True, retain_cls_token=False, ln_pre=True,
                   ln_post=False, return_interm_layers=False, bias_patch_embed=False,
                   compile_mode=compile_mode)  # fmt: skip

    def text(bpe_path):
        tokenizer = SimpleTokenizer(bpe_path=bpe_path)
        return VETextEncoder(tokenizer=tokenizer, d_model=256, width=256, heads=4, layers=1)

    def one_layer(make):
        def build():
            module = make()
            module.layers = module.layers[:1]
            module.num_layers = 1
            return module

        return build

    saved = {n: getattr(mb, n) for n in ("_create_vit_backbone", "_create_text_encoder",
                                         "_create_transformer_encoder",
                                         "_create_transformer_decoder")}  # fmt: skip
    mb._create_vit_backbone = vit
    mb._create_text_encoder = text
    mb._create_transformer_encoder = one_layer(saved["_create_transformer_encoder"])
    mb._create_transformer_decoder = one_layer(saved["_create_transformer_decoder"])
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(mb, name, fn)


def build_reduced(settings: Any, bpe: Path, device: str) -> Any:
    """``worker.segmenters.sam3.build_model`` on the reduced builders (SAM3D_SAM3_BUILDER=
    sam3_reduced:build_reduced in a worker process: the torchvision declaration comes first)."""
    declare_torchvision_ops()
    from worker.segmenters.sam3 import build_model

    with reduced_builders():
        return build_model(settings, bpe, device)
