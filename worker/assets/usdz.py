"""Meshes as USDZ (Apple's AR Quick Look) through Pixar's ``usd-core``.

One Xform per object (``object_{i}``, carrying its matrix in the scene), a Mesh under it with
vertex colours as ``displayColor`` (linear, as USD wants), bound to a UsdPreviewSurface that
reads them. Y up, metres per unit 1, as the GLB.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CONTENT_TYPE = "model/vnd.usdz+zip"
MeshArrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # vertices, faces, linear RGBA uint8


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
        material = UsdShade.Material.Define(stage, "/root/Material")
        surface = UsdShade.Shader.Define(stage, "/root/Material/Surface")
        surface.CreateIdAttr("UsdPreviewSurface")
        surface.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(0.8)
        reader = UsdShade.Shader.Define(stage, "/root/Material/VertexColor")
        reader.CreateIdAttr("UsdPrimvarReader_float3")
        reader.CreateInput("varname", Sdf.ValueTypeNames.Token).Set("displayColor")
        color = reader.CreateOutput("result", Sdf.ValueTypeNames.Float3)
        surface.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f).ConnectToSource(color)
        material.CreateSurfaceOutput().ConnectToSource(surface.ConnectableAPI(), "surface")
        for i, (vertices, faces, colors) in enumerate(meshes):
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
            rgb = np.ascontiguousarray(np.asarray(colors)[:, :3] / 255.0, dtype=np.float32)
            primvar = mesh.CreateDisplayColorPrimvar(UsdGeom.Tokens.vertex)
            primvar.Set(Vt.Vec3fArray.FromNumpy(rgb))
            UsdShade.MaterialBindingAPI.Apply(mesh.GetPrim()).Bind(material)
        stage.Save()
        if not UsdUtils.CreateNewUsdzPackage(Sdf.AssetPath(str(usdc)), str(usdz)):
            raise RuntimeError("usd-core could not write the USDZ package")
        return usdz.read_bytes()
