"""Generation options: declared once here, validated the same way by the CLI, API and worker."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
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
    parser: Callable[[Any], Any] | None = None  # structured options (``formats``, ``mesh``)
    schema: dict | None = None  # their JSON schema in /openapi.json (api.models.Options)

    def parse(self, value: Any) -> Any:
        """The value coerced to ``kind`` and range-checked, or ``invalid_option``."""
        if self.parser is not None:
            return self.parser(value)
        if self.kind is bool:
            if not isinstance(value, bool):
                raise Sam3dError(
                    ErrorCode.INVALID_OPTION, f"option {self.name!r} must be true/false"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise Sam3dError(ErrorCode.INVALID_OPTION, f"option {self.name!r} must be a number")
        if isinstance(value, str) and not _JSON_NUMBER.fullmatch(value):
            # A number written as a string ("0.5", from a form) is taken; Python's own forms
            # ("1_0_0", " 5 ", "inf", "0x10") are not numbers to a client.
            raise Sam3dError(
                ErrorCode.INVALID_OPTION, f"option {self.name!r} must be a number, got {value!r}"
            )
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


_JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")

# Asset formats: every object and the scene can have any of these files (issue 15).
ASSET_FORMATS = ("glb", "ply", "spz", "usdz", "splats_glb")
DEFAULT_FORMATS = ("glb", "ply")
MESH_COMPRESSIONS = ("none", "meshopt", "draco")
MIN_TARGET_FACES = 4
MIN_TEXTURE, MAX_TEXTURE = 256, 4096  # a baked texture's edge in pixels (option "texture")


def _bad(message: str) -> Sam3dError:
    return Sam3dError(ErrorCode.INVALID_OPTION, message)


def _format_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _bad(f"option {where!r} must be a list of formats from {', '.join(ASSET_FORMATS)}")
    unknown = sorted(set(value) - set(ASSET_FORMATS))
    if unknown:
        raise _bad(
            f"option {where!r}: unknown format(s) {', '.join(unknown)}; "
            f"known: {', '.join(ASSET_FORMATS)}"
        )
    return [f for f in ASSET_FORMATS if f in value]  # canonical order, no repeats


def parse_formats(value: Any) -> dict[str, list[str]]:
    """``formats``: one list for objects and scene, or ``{"objects": [...], "scene": [...]}``
    (an empty scene list: no scene files). Objects need at least one format."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"objects", "scene"})
        if unknown:
            raise _bad(f"option 'formats': unknown key(s) {', '.join(map(str, unknown))}")
        objects = _format_list(value.get("objects", list(DEFAULT_FORMATS)), "formats.objects")
        scene = _format_list(value.get("scene", objects), "formats.scene")
    else:
        objects = scene = _format_list(value, "formats")
    if not objects:
        raise _bad("option 'formats': every object needs at least one format")
    return {"objects": objects, "scene": list(scene)}


def parse_mesh(value: Any) -> dict[str, Any]:
    """``mesh``: ``{"target_faces": N or null, "compression": "none"|"meshopt"|"draco"}``."""
    if not isinstance(value, Mapping):
        raise _bad('option \'mesh\' must be an object: {"target_faces": N, "compression": ...}')
    unknown = sorted(set(value) - {"target_faces", "compression"})
    if unknown:
        raise _bad(f"option 'mesh': unknown key(s) {', '.join(map(str, unknown))}")
    faces = value.get("target_faces")
    if faces is not None and (
        isinstance(faces, bool) or not isinstance(faces, int) or faces < MIN_TARGET_FACES
    ):
        raise _bad(f"option 'mesh.target_faces' must be an integer >= {MIN_TARGET_FACES} or null")
    compression = value.get("compression", "none")
    if compression is None:
        compression = "none"
    if compression not in MESH_COMPRESSIONS:
        raise _bad(f"option 'mesh.compression' must be one of {', '.join(MESH_COMPRESSIONS)}")
    return {"target_faces": faces, "compression": compression}


_FORMAT_LIST_SCHEMA = {"type": "array", "items": {"enum": list(ASSET_FORMATS)}}
COMMON_OPTIONS = (
    Option("seed", int, 0, "random seed; the same seed gives the same assets", 0, 2**31 - 1),
    Option(
        "formats",
        dict,
        {"objects": list(DEFAULT_FORMATS), "scene": list(DEFAULT_FORMATS)},
        "files per object and for the scene, from glb, ply, spz, usdz, splats_glb: one list "
        "for both, or {objects: [...], scene: [...]}",
        parser=parse_formats,
        schema={
            "oneOf": [
                _FORMAT_LIST_SCHEMA,
                {
                    "type": "object",
                    "properties": {"objects": _FORMAT_LIST_SCHEMA, "scene": _FORMAT_LIST_SCHEMA},
                    "additionalProperties": False,
                },
            ]
        },
    ),
    Option("scene", bool, True, "write the scene files (false: per-object files only)"),
    Option(
        "texture",
        int,
        0,
        f"UV-unwrap every mesh and bake its base colour into a square texture of this edge "
        f"({MIN_TEXTURE}-{MAX_TEXTURE} px; 0: vertex colours)",
        0,
        MAX_TEXTURE,
    ),
    Option(
        "mesh",
        dict,
        {"target_faces": None, "compression": "none"},
        "mesh control: decimate to at most target_faces faces (colours kept); compress the "
        "GLB meshes with meshopt or draco",
        parser=parse_mesh,
        schema={
            "type": "object",
            "properties": {
                "target_faces": {"type": ["integer", "null"], "minimum": MIN_TARGET_FACES},
                "compression": {"enum": list(MESH_COMPRESSIONS)},
            },
            "additionalProperties": False,
        },
    ),
)


def scene_formats(options: Mapping[str, Any]) -> list[str]:
    """The scene's formats under ``options`` (none when ``scene`` is off)."""
    formats = options.get("formats") or {"scene": list(DEFAULT_FORMATS)}
    return list(formats["scene"]) if options.get("scene", True) else []


def object_formats(options: Mapping[str, Any]) -> list[str]:
    """Every object's formats under ``options``."""
    return list((options.get("formats") or {"objects": list(DEFAULT_FORMATS)})["objects"])


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
    parsed = {
        name: spec.parse(given[name]) if name in given else _copy(spec.default)
        for name, spec in specs.items()
    }
    if 0 < parsed["texture"] < MIN_TEXTURE:
        raise _bad(f"option 'texture' must be 0 (vertex colours) or {MIN_TEXTURE}-{MAX_TEXTURE}")
    return parsed


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return list(value) if isinstance(value, list) else value
