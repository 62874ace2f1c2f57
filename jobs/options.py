"""Generation options: declared once here, validated the same way by the CLI, API and worker."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jobs.errors import ErrorCode, Sam3dError


@dataclass(frozen=True)
class Option:
    """One option: its type, default, accepted range and meaning."""

    name: str
    kind: type
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def parse(self, value: Any) -> Any:
        """The value coerced to ``kind`` and range-checked, or ``invalid_option``."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise Sam3dError(
                    ErrorCode.INVALID_OPTION, f"option {self.name!r} must be true/false"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise Sam3dError(ErrorCode.INVALID_OPTION, f"option {self.name!r} must be a number")
        try:
            parsed = self.kind(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise Sam3dError(
                ErrorCode.INVALID_OPTION, f"option {self.name!r} must be {self.kind.__name__}"
            ) from None
        if self.kind is int and isinstance(value, float) and not value.is_integer():
            raise Sam3dError(ErrorCode.INVALID_OPTION, f"option {self.name!r} must be an integer")
        if self.choices and parsed not in self.choices:
            raise Sam3dError(
                ErrorCode.INVALID_OPTION,
                f"option {self.name!r} must be one of {', '.join(map(str, self.choices))}",
            )
        if (
            parsed != parsed
            or parsed in (float("inf"), float("-inf"))
            or (self.low is not None and parsed < self.low)
            or (self.high is not None and parsed > self.high)
        ):
            raise Sam3dError(
                ErrorCode.INVALID_OPTION,
                f"option {self.name!r} must be within [{self.low}, {self.high}], got {value!r}",
            )
        return parsed


COMMON_OPTIONS = (
    Option("seed", int, 0, "random seed; the same seed gives the same assets", 0, 2**31 - 1),
)

INFLATE_OPTIONS = (
    Option("resolution", int, 96, "grid cells along the longer side of each mask", 16, 512),
    Option("splats", int, 20_000, "Gaussians sampled on each object's surface", 100, 2_000_000),
    Option("fov_deg", float, 60.0, "horizontal field of view of the camera, degrees", 5.0, 170.0),
    Option("depth", float, 3.0, "distance of every object's centre from the camera", 0.01, 1e6),
)

SAM3D_OPTIONS = (
    Option("stage1_steps", int, 0, "geometry flow steps; 0: 25, or 4 in fast mode", 0, 200),
    Option(
        "stage2_steps", int, 0, "texture/refinement flow steps; 0: 25, or 4 in fast mode", 0, 200
    ),
    Option("fast", bool, False, "both distilled models and few steps (about 4x quicker)"),
    Option("texture_baking", bool, False, "bake a texture (non-commercial dependencies)"),
    Option("mesh_postprocess", bool, False, "simplify and clean the mesh (non-commercial deps)"),
    Option("splats_per_voxel", int, 32, "32, or 4 with the gaussian_4 decoder", choices=(4, 32)),
)

BACKEND_OPTIONS: dict[str, tuple[Option, ...]] = {
    "inflate": INFLATE_OPTIONS,
    "sam3d": SAM3D_OPTIONS,
}


def parse_options(backend: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every option of ``backend`` with defaults filled in; unknown names are refused."""
    if backend not in BACKEND_OPTIONS:
        raise Sam3dError(
            ErrorCode.UNKNOWN_BACKEND,
            f"unknown backend {backend!r}; known: {', '.join(sorted(BACKEND_OPTIONS))}",
        )
    if options is not None and not isinstance(options, Mapping):
        raise Sam3dError(ErrorCode.INVALID_OPTION, "options must be a JSON object")
    specs = {o.name: o for o in COMMON_OPTIONS + BACKEND_OPTIONS[backend]}
    given = dict(options or {})
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise Sam3dError(
            ErrorCode.INVALID_OPTION,
            f"unknown option(s) {', '.join(unknown)} for backend {backend!r}; "
            f"known: {', '.join(sorted(specs))}",
        )
    return {
        name: spec.parse(given[name]) if name in given else spec.default
        for name, spec in specs.items()
    }
