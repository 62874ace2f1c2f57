"""Quaternions, poses and splat transforms checked against scipy's independent implementation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jobs.frames import (
    Camera,
    Pose,
    matrix_to_quat,
    pose_from_matrix,
    quat_multiply,
    quat_to_matrix,
    similarity_parts,
)
from worker.assets.ply import export_splat_ply, read_splat_ply, splat_rows
from worker.assets.scene import (
    compose_scene_gaussians,
    transform_gaussians,
    transform_splat_rows,
)
from worker.backends.base import Gaussians

RNG = np.random.default_rng(3)


def wxyz(rot: Rotation) -> np.ndarray:
    return rot.as_quat()[..., [3, 0, 1, 2]]


def random_gaussians(n: int) -> Gaussians:
    return Gaussians(
        positions=RNG.uniform(-0.5, 0.5, (n, 3)).astype(np.float32),
        rotations=wxyz(Rotation.random(n, random_state=4)).astype(np.float32),
        scales=RNG.uniform(0.001, 0.05, (n, 3)).astype(np.float32),
        opacities=RNG.uniform(0.05, 0.95, n).astype(np.float32),
        colors=RNG.uniform(0, 1, (n, 3)).astype(np.float32),
    )


def test_quaternion_conversions_match_scipy():
    rots = Rotation.random(500, random_state=1)
    assert np.allclose(quat_to_matrix(wxyz(rots)), rots.as_matrix(), atol=1e-12)
    q = matrix_to_quat(rots.as_matrix())
    assert (q[:, 0] >= 0).all()
    assert np.allclose(Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix(), rots.as_matrix())


def test_quaternion_product_composes_rotations():
    a, b = Rotation.random(50, random_state=2), Rotation.random(50, random_state=3)
    product = quat_multiply(wxyz(a), wxyz(b))
    assert np.allclose(quat_to_matrix(product), (a * b).as_matrix(), atol=1e-12)


def test_pose_round_trips_through_matrix():
    for rot in Rotation.random(20, random_state=5):
        pose = Pose(tuple(wxyz(rot)), tuple(RNG.normal(size=3)), (0.7, 0.7, 0.7))
        back = pose_from_matrix(pose.matrix())
        assert np.allclose(back.matrix(), pose.matrix(), atol=1e-12)
        # Same rotation up to the quaternion's sign.
        assert np.isclose(abs(np.dot(back.rotation, pose.rotation)), 1)


@pytest.mark.parametrize(
    "linear",
    [np.diag([1.0, 2.0, 1.0]), np.array([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]]), -np.eye(3)],
    ids=["non-uniform", "shear", "reflection"],
)
def test_non_similarity_transforms_are_refused(linear):
    m = np.eye(4)
    m[:3, :3] = linear
    with pytest.raises(ValueError):
        pose_from_matrix(m)
    with pytest.raises(ValueError):
        similarity_parts(m)


def test_transformed_gaussians_have_the_transformed_covariance():
    """Sigma' = L Sigma L^T: the exact law for a Gaussian under a linear map."""
    g = random_gaussians(200)
    m = np.eye(4)
    m[:3, :3] = 1.7 * Rotation.random(random_state=6).as_matrix()
    m[:3, 3] = [0.3, -1.0, -4.0]
    moved = transform_gaussians(g, m)

    def covariance(gs: Gaussians) -> np.ndarray:
        r = Rotation.from_quat(gs.rotations[:, [1, 2, 3, 0]]).as_matrix()
        s = gs.scales.astype(np.float64)
        return np.einsum("nij,nj,nkj->nik", r, s**2, r)

    linear = m[:3, :3]
    expected = linear @ covariance(g) @ linear.T
    assert np.allclose(covariance(moved), expected, atol=1e-6)
    assert np.allclose(moved.positions, g.positions @ linear.T + m[:3, 3], atol=1e-5)


def test_moving_ply_rows_equals_encoding_the_moved_gaussians():
    """The scene's rows are moved from the object's encoded rows (no second encoding): the
    same numbers as encoding the transformed Gaussians."""
    g = random_gaussians(500)
    m = np.eye(4)
    m[:3, :3] = 0.6 * Rotation.random(random_state=3).as_matrix()
    m[:3, 3] = [0.5, 0.25, -3.0]
    moved = transform_splat_rows(splat_rows(g), m)
    expected = splat_rows(transform_gaussians(g, m))
    assert moved.dtype == np.dtype("<f4") and moved.shape == expected.shape
    assert np.allclose(moved, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(splat_rows(g)[:, 6:10], moved[:, 6:10])  # colours, opacity: copied


def test_scene_concatenates_in_object_order():
    a, b = random_gaussians(10), random_gaussians(7)
    shift = np.eye(4)
    shift[:3, 3] = [1, 2, 3]
    scene = compose_scene_gaussians([a, b], [np.eye(4), shift])
    assert len(scene) == 17
    assert np.allclose(scene.positions[:10], a.positions)
    assert np.allclose(scene.positions[10:], b.positions + [1, 2, 3])


def test_ply_round_trip_keeps_values():
    g = random_gaussians(1000)
    back = read_splat_ply(export_splat_ply(g))
    for field in ("positions", "scales", "opacities", "colors"):
        assert np.allclose(getattr(back, field), getattr(g, field), rtol=1e-5, atol=1e-6)
    assert np.allclose(np.abs(np.sum(back.rotations * g.rotations, 1)), 1, atol=1e-6)


def test_camera_projection_follows_the_documented_formula():
    cam = Camera.from_fov(640, 480, 60)
    assert np.isclose(cam.fx, 320 / np.tan(np.radians(30)))
    uv = cam.project(np.array([[0.0, 0.0, -2.0], [1.0, 1.0, -2.0]]))
    assert np.allclose(uv[0], [320, 240])
    assert np.allclose(uv[1], [320 + cam.fx / 2, 240 - cam.fy / 2])
