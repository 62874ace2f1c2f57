"""Run inside Blender's Python (the ``bpy`` module, tests/test_blender.py): Blender's own glTF
importer reads a GLB; what it made of each mesh's material, some texels as Blender decoded
them, and, given a camera, a Cycles render of the scene under a uniform white sky.

    python tests/blender_import.py GLB OUT.json [--render OUT.png --camera JSON]

The camera is the manifest's (width, height, K in pixels; the scene GLB is in
its frame: glTF's -Z forward, +Y up, which the importer turns into Blender's +Y forward, +Z up).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import bpy


def material_report(obj) -> dict:
    mesh = obj.data
    report: dict = {"name": obj.name, "uv_layers": [layer.name for layer in mesh.uv_layers]}
    material = mesh.materials[0] if mesh.materials else None
    if material is None or not material.use_nodes:
        return report
    bsdf = next((n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED"), None)
    links = bsdf.inputs["Base Color"].links if bsdf is not None else []
    source = links[0].from_node if links else None
    report["base_color_from"] = source.type if source is not None else None
    if source is None or source.type != "TEX_IMAGE" or not mesh.uv_layers:
        return report
    image = source.image
    width, height = image.size
    report["image"] = {"size": [width, height], "colorspace": image.colorspace_settings.name}
    # Texels as Blender decoded them, at the UVs Blender holds for the first loops (its V
    # runs up from the image's bottom row, pixels are stored bottom row first).
    pixels = image.pixels[:]
    uvs = mesh.uv_layers.active.data
    samples = []
    for i in range(0, len(uvs), max(1, len(uvs) // 400)):
        u, v = uvs[i].uv
        x = min(int(u * width), width - 1)
        y = min(int(v * height), height - 1)
        at = (y * width + x) * 4
        samples.append([u, v, *[round(c * 255) for c in pixels[at : at + 3]]])
    report["texels"] = samples
    return report


def render(path: str, camera: dict, scale: float) -> None:
    (fx, _, cx), (_, _, cy), _ = camera["K"]
    width, height = camera["width"], camera["height"]
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 16
    scene.render.resolution_x = round(width * scale)
    scene.render.resolution_y = round(height * scale)
    scene.render.film_transparent = True
    scene.view_settings.view_transform = "Standard"  # sRGB out, as the photo
    world = bpy.data.worlds.new("sky")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs[0].default_value = (1, 1, 1, 1)
    scene.world = world
    data = bpy.data.cameras.new("photo")
    data.sensor_fit = "HORIZONTAL"
    data.lens = fx * data.sensor_width / width
    data.shift_x = (width / 2 - cx) / width
    data.shift_y = (cy - height / 2) / width
    obj = bpy.data.objects.new("photo", data)
    obj.rotation_euler = (math.pi / 2, 0, 0)  # looks along +Y, +Z up
    scene.collection.objects.link(obj)
    scene.camera = obj
    scene.render.filepath = path
    bpy.ops.render.render(write_still=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("glb")
    parser.add_argument("out")
    parser.add_argument("--render")
    parser.add_argument("--camera", help="the manifest's camera, as JSON")
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument(
        "--unlink-texture", action="store_true", help="the control: base colours left unlinked"
    )
    args = parser.parse_args()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=args.glb)
    meshes = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    report = {"meshes": [material_report(o) for o in meshes]}
    if args.unlink_texture:
        for material in bpy.data.materials:
            for bsdf in [n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED"]:
                for link in bsdf.inputs["Base Color"].links:
                    material.node_tree.links.remove(link)
    if args.render:
        render(args.render, json.loads(args.camera), args.scale)
    with open(args.out, "w") as f:
        json.dump(report, f)
    os._exit(0)  # bpy 4.2 as a module can crash in its own teardown at exit: skip it


if __name__ == "__main__":
    main()
