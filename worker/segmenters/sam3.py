"""SAM 3 (Meta, PyPI ``sam3``): masks from boxes, points and text, resident beside the 3D model.

Why PyPI's ``sam3`` and not the Transformers classes: it is Meta's own code, one model holds
both heads this service needs (text grounding and SAM-1-style box/point prompts) over one
image encoding, its ``predict_inst`` batches every box of an image in one call, and it is
what was measured on the H200 (image 32 ms, text 51 ms, 64 boxes 0.17 s, 6 GB). Transformers
splits the two heads into two models (``Sam3Model``, ``Sam3TrackerModel``).

Per image: one ``set_image``; the box (and box + points) prompts in one batched
``predict_inst`` call, the points-only prompts in a second (SAM cannot mix "no box" into a
batch with boxes); one ``set_text_prompt`` per distinct text. Importing this module imports
neither torch nor ``sam3``: ``setup`` does, after the checks.

sam3 0.1.4 creates some tensors with ``device="cuda"`` hard-coded; on a CPU (tests,
``SAM3D_SAM3_DEVICE=cpu``) the model is built and run under ``cpu_mode()``, which maps those
to the CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs.errors import ErrorCode, Sam3dError
from jobs.settings import Settings
from worker.segmenters.base import Segment, inscribed_ellipse

SAM3_VERSION = "0.1.4"  # the PyPI release this is written and measured against
MIN_FREE_GPU_GB = 8.0  # measured peak 6 GB with 64 boxes on the H200
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _refuse(message: str) -> Sam3dError:
    return Sam3dError(ErrorCode.PREFLIGHT_FAILED, message)


def find_bpe(settings: Settings) -> Path:
    """CLIP's BPE vocabulary: the setting, else the copy PyPI's ``open_clip_torch`` ships
    (sam3's wheel lacks it); found without importing open_clip."""
    if settings.sam3_bpe_path:
        path = Path(settings.sam3_bpe_path)
    else:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise _refuse(
                f"sam3 needs CLIP's {BPE_FILE}: pip install open_clip_torch (its wheel ships "
                "it) or set SAM3D_SAM3_BPE_PATH"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise _refuse(f"sam3's BPE vocabulary {path} is missing (SAM3D_SAM3_BPE_PATH)")
    return path


def preflight(settings: Settings) -> dict[str, Any]:
    """Refuse, with a clear message, a worker that cannot run SAM 3: the package missing,
    no checkpoint (unless random weights are asked for), too little free GPU memory (read
    through NVML: no CUDA context, safe in a forking parent)."""
    for module, what in (("torch", "PyTorch"), ("sam3", f"PyPI's sam3 {SAM3_VERSION}")):
        if importlib.util.find_spec(module) is None:
            raise _refuse(f"segmenter sam3 needs {what}: pip install -r requirements/gpu-sam3.txt")
    bpe = find_bpe(settings)
    checkpoint = settings.sam3_checkpoint
    if checkpoint and not Path(checkpoint).is_file():
        raise _refuse(f"SAM3D_SAM3_CHECKPOINT {checkpoint} is not a file")
    if not checkpoint and not settings.sam3_random_weights:
        raise _refuse(
            "segmenter sam3 needs its weights: set SAM3D_SAM3_CHECKPOINT to sam3.pt (the gated "
            "Hugging Face repo facebook/sam3); SAM3D_SAM3_RANDOM_WEIGHTS=1 is for benches only"
        )
    from worker.gpu import gpu_status

    gpu = gpu_status() if settings.sam3_device in ("auto", "cuda") else None  # NVML: no CUDA
    device = settings.sam3_device
    if device == "auto":
        device = "cuda" if gpu else "cpu"
    info: dict[str, Any] = {"device": device, "bpe": str(bpe), "checkpoint": checkpoint or None}
    if device == "cuda":
        if not gpu:
            raise _refuse("SAM3D_SAM3_DEVICE=cuda but no NVIDIA GPU is visible")
        free_gb = gpu["memory_free_mb"] / 1024
        info["free_gpu_gb"] = round(free_gb, 2)
        if free_gb < MIN_FREE_GPU_GB:
            raise _refuse(
                f"sam3 needs {MIN_FREE_GPU_GB:g} GB of free GPU memory beside the 3D model; "
                f"GPU {gpu['index']} has {free_gb:.1f} GB free"
            )
    return info


@contextlib.contextmanager
def cpu_mode() -> Iterator[None]:
    """Run sam3 on a CPU: its hard-coded ``device="cuda"`` tensors (and ``.cuda()``,
    ``pin_memory()``) go to the CPU instead."""
    import torch

    class _CpuOnly(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
                return args[0]
            if func is torch.Tensor.to and len(args) > 1 and str(args[1]).startswith("cuda"):
                args = (args[0], "cpu", *args[2:])
            return func(*args, **kwargs)

    with _CpuOnly():
        yield


def build_model(settings: Settings, bpe: Path, device: str) -> Any:
    """SAM 3's image model with its instance-prompt head, weights from the checkpoint (or
    random ones)."""
    from sam3.model_builder import build_sam3_image_model

    model = build_sam3_image_model(
        bpe_path=str(bpe),
        device=device,
        checkpoint_path=settings.sam3_checkpoint or None,
        load_from_HF=False,
        enable_inst_interactivity=True,
    )
    if not settings.sam3_checkpoint:
        fill_unset_parameters(model)
    return model


def fill_unset_parameters(model: Any, limit: float = 1e4) -> int:
    """sam3 leaves some parameters as ``torch.empty`` for its checkpoint to fill (the text
    encoder's positional embedding and projection among them): with random weights their
    garbage (NaN, or huge) turns every text answer into NaN. Those are drawn from N(0, 0.02)
    instead; returns how many tensors were filled."""
    import torch

    filled = 0
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and not (param.isfinite() & (param.abs() < limit)).all():
                param.normal_(0.0, 0.02)
                filled += 1
    return filled


def _builder(spec: str) -> Callable[[Settings, Path, str], Any] | None:
    """``module:function`` from SAM3D_SAM3_BUILDER, or None."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise _refuse(f"SAM3D_SAM3_BUILDER {spec!r} cannot be loaded: {exc}") from None


class Sam3Segmenter:
    """Boxes, points and text to masks with SAM 3, set up once per worker process."""

    name = "sam3"
    prompt_kinds = frozenset({"box", "points", "text"})

    def __init__(
        self, settings: Settings, build: Callable[[Settings, Path, str], Any] | None = None
    ) -> None:
        self.settings = settings
        self.build = build or _builder(settings.sam3_builder) or build_model
        self.model: Any = None
        self.processor: Any = None
        self.device = "cpu"
        weights = "random weights" if not settings.sam3_checkpoint else "checkpoint"
        self.version = f"sam3-{SAM3_VERSION} ({weights})"

    def setup(self) -> None:
        """Checks, then the model built and kept resident (eval mode, no gradients)."""
        info = preflight(self.settings)
        self.device = info["device"]
        with self._on_device():
            self.model = self.build(self.settings, Path(info["bpe"]), self.device)
            from sam3.model.sam3_image_processor import Sam3Processor

            self.processor = Sam3Processor(self.model, device=self.device)

    def _on_device(self) -> contextlib.AbstractContextManager:
        return cpu_mode() if self.device == "cpu" else contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.device == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def segment(self, image: np.ndarray, prompts: Sequence[Mapping[str, Any]]) -> list[Segment]:
        """Every prompt of ``image``: one image encoding, batched box/point calls, one text
        call per distinct text; segments in prompt order (a text's by falling score)."""
        import torch
        from PIL import Image

        if self.model is None:
            raise RuntimeError("Sam3Segmenter.setup() was not called")
        size = image.shape[:2]
        found: dict[int, list[Segment]] = {}
        with self._on_device(), torch.inference_mode(), self._autocast():
            state = self.processor.set_image(Image.fromarray(np.ascontiguousarray(image[..., :3])))
            boxed = [i for i, p in enumerate(prompts) if "box" in p]
            clicked = [i for i, p in enumerate(prompts) if "box" not in p and "points" in p]
            for group in (boxed, clicked):
                if group:
                    for i, segment in zip(
                        group, self._geometric(state, prompts, group, size), strict=True
                    ):
                        found[i] = [segment]
            texts: dict[str, list[Segment]] = {}
            for i, prompt in enumerate(prompts):
                if "text" in prompt:
                    key = prompt["text"]
                    if key not in texts:
                        texts[key] = self._text(state, key)
                    found[i] = [
                        Segment(s.mask, i, s.score, s.notes)
                        for s in texts[key]
                        if s.score is not None and s.score >= prompt["min_score"]
                    ][: prompt["max_objects"]]
        return [segment for i in range(len(prompts)) for segment in found.get(i, [])]

    def _geometric(
        self,
        state: dict,
        prompts: Sequence[Mapping[str, Any]],
        group: Sequence[int],
        size: tuple[int, int],
    ) -> list[Segment]:
        """Box and/or point prompts in ONE ``predict_inst`` call; points padded with label
        -1 (SAM's "no point") to a common count."""
        kwargs: dict[str, Any] = {"multimask_output": False}
        if "box" in prompts[group[0]]:
            kwargs["box"] = np.array([prompts[i]["box"] for i in group], np.float32)
        most = max(len(prompts[i].get("points", ())) for i in group)
        if most:
            coords = np.zeros((len(group), most, 2), np.float32)
            labels = np.full((len(group), most), -1, np.int32)
            for row, i in enumerate(group):
                for col, (x, y, label) in enumerate(prompts[i].get("points", ())):
                    coords[row, col], labels[row, col] = (x, y), label
            kwargs["point_coords"], kwargs["point_labels"] = coords, labels
        masks, scores, _ = self.model.predict_inst(state, **kwargs)
        masks = np.asarray(masks).reshape(len(group), -1, *size)[:, 0] > 0
        scores = np.asarray(scores, np.float32).reshape(len(group), -1)[:, 0]
        segments = []
        for row, i in enumerate(group):
            mask, notes, fallback = masks[row], (), None
            if not mask.any():
                box = prompts[i].get("box") or _points_box(prompts[i]["points"], size)
                mask = inscribed_ellipse(size, box)
                notes = ("sam3 returned an empty mask: the ellipse inscribed in the box is used",)
                fallback = "ellipse"
            segments.append(Segment(mask, i, round(float(scores[row]), 4), notes, fallback))
        return segments

    def _text(self, state: dict, text: str) -> list[Segment]:
        """Every instance of ``text``, best first (no threshold yet: each prompt has its own)."""
        self.processor.set_confidence_threshold(0.0)
        out = self.processor.set_text_prompt(prompt=text, state=state)
        masks = np.asarray(out["masks"].float().cpu()).reshape(
            len(out["scores"]), *state_size(state)
        )
        scores = np.asarray(out["scores"].float().cpu())
        order = np.argsort(-scores, kind="stable")
        return [
            Segment(masks[k] > 0.5, -1, round(float(scores[k]), 4))
            for k in order
            if (masks[k] > 0.5).any()
        ]


def state_size(state: Mapping[str, Any]) -> tuple[int, int]:
    return int(state["original_height"]), int(state["original_width"])


def _points_box(points: Sequence[Sequence[float]], size: tuple[int, int]) -> list[float]:
    on = np.array([p[:2] for p in points if p[2]] or [p[:2] for p in points], np.float64)
    grow = 0.05 * min(size)
    x0, y0 = on.min(axis=0) - grow
    x1, y1 = on.max(axis=0) + grow
    return [max(0.0, x0), max(0.0, y0), min(float(size[1]), x1), min(float(size[0]), y1)]
