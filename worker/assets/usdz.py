"""Meshes as USDZ (Apple's AR Quick Look) through Pixar's ``usd-core``.

One Xform per object (``object_{i}``, carrying its matrix in the scene), a Mesh under it with
vertex colours as ``displayColor`` (linear, as USD wants), bound to a UsdPreviewSurface that
reads them; or, for a textured object, its UVs as the ``st`` primvar and its base-colour PNG
(sRGB) in the package, read by a UsdUVTexture into the surface's ``diffuseColor``. Y up,
metres per unit 1, as the GLB.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CONTENT_TYPE = "model/vnd.usdz+zip"
# vertices, faces, linear RGBA uint8 colours; then, textured: colours None, UVs (glTF's: origin
# top-left), the base-colour PNG
MeshArrays = tuple


def export_usdz(
    meshes: Sequence[MeshArrays], matrices: Sequence[np.ndarray] | None = None
) -> bytes:
    """A USDZ holding ``meshes``; object i under ``/root/object_{i}`` with ``matrices[i]``
    (column-vector 4x4) as its transform, or none for a single object in its local frame."""
    from pxr import Gf, Sdf, Usd, UsdGeom, UsdShade, UsdUtils, Vt

    with tempfile.TemporaryDirectory(prefix="sam3d-usdz-") as tmp:
        usdc, usdz = Path(tmp) / "model.usdc", Path(tmp) / "model.usdz"
        stage = Usd.Stage.CreateNew(str(usdc))
        UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.y)
        UsdGeom.SetStageMetersPerUnit(stage, 1.0)
        root = UsdGeom.Xform.Define(stage, "/root")
        stage.SetDefaultPrim(root.GetPrim())
        material = None
        for i, (vertices, faces, colors, *texture) in enumerate(meshes):
            xform = UsdGeom.Xform.Define(stage, f"/root/object_{i}")
            if matrices is not None:
                # USD multiplies row vectors: its matrix is the transpose of ours.
                m = np.asarray(matrices[i], dtype=np.float64).T
                xform.AddTransformOp().Set(Gf.Matrix4d(m.tolist()))
            mesh = UsdGeom.Mesh.Define(stage, f"/root/object_{i}/mesh")
            points = np.ascontiguousarray(vertices, dtype=np.float32)
            mesh.CreatePointsAttr(Vt.Vec3fArray.FromNumpy(points))
            mesh.CreateFaceVertexCountsAttr(Vt.IntArray.FromNumpy(np.full(len(faces), 3, "i4")))
            mesh.CreateFaceVertexIndicesAttr(
                Vt.IntArray.FromNumpy(np.ascontiguousarray(faces, dtype=np.int32).reshape(-1))
            )
            mesh.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)
            if len(points):
                mesh.CreateExtentAttr(
                    Vt.Vec3fArray(
                        [Gf.Vec3f(*points.min(0).tolist()), Gf.Vec3f(*points.max(0).tolist())]
                    )
                )
            uvs, png = texture if texture and texture[1] is not None else (None, None)
            if png is not None:
                st = np.ascontiguousarray(uvs, dtype=np.float32).copy()
                st[:, 1] = 1.0 - st[:, 1]  # USD's st origin is the image's bottom-left
                primvar = UsdGeom.PrimvarsAPI(mesh.GetPrim()).CreatePrimvar(
                    "st", Sdf.ValueTypeNames.TexCoord2fArray, UsdGeom.Tokens.vertex
                )
                primvar.Set(Vt.Vec2fArray.FromNumpy(st))
                name = f"object_{i}.png"  # beside the layer: packaged as it is named
                (Path(tmp) / name).write_bytes(png)
                bound = _texture_material(stage, f"/root/object_{i}/Material", name)
            else:
                rgb = np.ascontiguousarray(np.asarray(colors)[:, :3] / 255.0, dtype=np.float32)
                primvar = mesh.CreateDisplayColorPrimvar(UsdGeom.Tokens.vertex)
                primvar.Set(Vt.Vec3fArray.FromNumpy(rgb))
                material = material or _vertex_color_material(stage)
                bound = material
            UsdShade.MaterialBindingAPI.Apply(mesh.GetPrim()).Bind(bound)
        stage.Save()
        if not UsdUtils.CreateNewUsdzPackage(Sdf.AssetPath(str(usdc)), str(usdz)):
            raise RuntimeError("usd-core could not write the USDZ package")
        return usdz.read_bytes()


def _surface(stage, path: str):
    from pxr import Sdf, UsdShade

    material = UsdShade.Material.Define(stage, path)
    surface = UsdShade.Shader.Define(stage, f"{path}/Surface")
    surface.CreateIdAttr("UsdPreviewSurface")
    surface.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(0.8)
    material.CreateSurfaceOutput().ConnectToSource(surface.ConnectableAPI(), "surface")
    return material, surface


def _vertex_color_material(stage):
    """One material for every vertex-coloured mesh: ``displayColor`` as the diffuse colour."""
    from pxr import Sdf, UsdShade

    material, surface = _surface(stage, "/root/Material")
    reader = UsdShade.Shader.Define(stage, "/root/Material/VertexColor")
    reader.CreateIdAttr("UsdPrimvarReader_float3")
    reader.CreateInput("varname", Sdf.ValueTypeNames.Token).Set("displayColor")
    color = reader.CreateOutput("result", Sdf.ValueTypeNames.Float3)
    surface.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f).ConnectToSource(color)
    return material


def _texture_material(stage, path: str, file: str):
    """A material whose diffuse colour is the texture ``file`` (sRGB) read at ``st``."""
    from pxr import Sdf, UsdShade

    material, surface = _surface(stage, path)
    st = UsdShade.Shader.Define(stage, f"{path}/St")
    st.CreateIdAttr("UsdPrimvarReader_float2")
    st.CreateInput("varname", Sdf.ValueTypeNames.Token).Set("st")
    coords = st.CreateOutput("result", Sdf.ValueTypeNames.Float2)
    texture = UsdShade.Shader.Define(stage, f"{path}/BaseColor")
    texture.CreateIdAttr("UsdUVTexture")
    texture.CreateInput("file", Sdf.ValueTypeNames.Asset).Set(file)
    texture.CreateInput("sourceColorSpace", Sdf.ValueTypeNames.Token).Set("sRGB")
    texture.CreateInput("wrapS", Sdf.ValueTypeNames.Token).Set("clamp")
    texture.CreateInput("wrapT", Sdf.ValueTypeNames.Token).Set("clamp")
    texture.CreateInput("st", Sdf.ValueTypeNames.Float2).ConnectToSource(coords)
    rgb = texture.CreateOutput("rgb", Sdf.ValueTypeNames.Float3)
    surface.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f).ConnectToSource(rgb)
    return material
